"""Routing state belongs to one forward call: one patched model shared by threads, re-entrant calls,
and activation checkpointing with several forwards before one backward."""
import copy
import functools
import threading
import time

import pytest
import torch

import moebert_kernels as mk
from test_families import V, batch, tiny
from test_model_tools import no_dropout

ROUTERS = ["hash", "balanced_hash", "token_gate", "sentence_gate"]
SHAPES = [(3, 9), (2, 9), (3, 7), (2, 12)]  # calls of one shape interleave with calls of another


def patched(family, router, **kw):
    model = tiny(family)
    if router == "balanced_hash":
        kw["token_counts"] = torch.randint(0, 50, (V,))
    return mk.patch(model, num_experts=4, expert_size=24, shared=12, router=router, seed=3, **kw)


def labels_for(ids):
    return torch.arange(ids.shape[0]) % 3


def run_in_threads(fn, jobs_per_thread):
    """Run ``fn(*job)`` for each thread's jobs, all threads released at once; the results
    (or the exceptions raised) in the jobs' order."""
    barrier = threading.Barrier(len(jobs_per_thread))
    results = [[None] * len(jobs) for jobs in jobs_per_thread]

    def work(t):
        barrier.wait()
        for i, job in enumerate(jobs_per_thread[t]):
            try:
                results[t][i] = fn(*job)
            except Exception as e:  # noqa: BLE001 - a wrong call is reported below, with its error
                results[t][i] = e

    threads = [threading.Thread(target=work, args=(t,)) for t in range(len(jobs_per_thread))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results


def call(model, ids, mask):
    """One call as a training loop makes it (grad on, labels, aux loss) and what it reads afterwards."""
    out = model(input_ids=ids, attention_mask=mask, labels=labels_for(ids))
    aux = mk.aux_loss(model)
    return out.logits.detach(), out.loss.detach(), None if aux is None else aux.detach()


def assert_same(got, want, what):
    assert not isinstance(got, Exception), f"{what} raised {type(got).__name__}: {got}"
    for g, w, name in zip(got, want, ("logits", "loss", "aux_loss")):
        if w is None:
            assert g is None, f"{what}: {name}"
        else:
            # The same ops on the same inputs: bit-exact single-threaded; a wrong plan is O(1e-2) off.
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7, msg=lambda m: f"{what}: {name}: {m}")


# -- threads -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family, router", [("bert", r) for r in ROUTERS] + [
    (f, r) for f in ("distilbert", "modernbert") for r in ("hash", "sentence_gate")])
def test_threads_sharing_one_model_each_get_the_single_threaded_result(family, router):
    coef = {"aux_loss_coef": 0.5} if router.endswith("gate") else {}
    model = patched(family, router, **coef).eval()  # eval: no dropout, so every call is reproducible
    jobs = [[batch(*SHAPES[(t + i) % len(SHAPES)]) for i in range(30)] for t in range(2)]
    want = [[call(model, *job) for job in thread_jobs] for thread_jobs in jobs]
    got = run_in_threads(functools.partial(call, model), jobs)
    for t in range(2):
        for i in range(30):
            assert_same(got[t][i], want[t][i], f"thread {t} call {i}")


@pytest.mark.parametrize("router", ROUTERS)
def test_compiled_model_shared_by_threads(router, compare=3, compile_in_place=False, widen_race=False):
    torch._dynamo.reset()
    coef = {"aux_loss_coef": 0.5} if router.endswith("gate") else {}
    model = patched("bert", router, **coef).eval()
    shapes = SHAPES[:2]
    jobs = [[batch(*shapes[(t + i) % 2]) for i in range(15)] for t in range(2)]
    want = [[call(model, *job) for job in thread_jobs] for thread_jobs in jobs]
    if compile_in_place:
        model.compile(fullgraph=True, backend="eager")
        compiled = model
    else:
        compiled = torch.compile(model, fullgraph=True, backend="eager")
    if widen_race:
        # torch.compile runs the model's hooks outside the compiled forward, which hands the layers' aux
        # losses to the loss hook as attributes: a pause between the two lets the other thread's call
        # write its own there (without the pause the race shows in about 1 call in 30).
        model.register_forward_hook(torch.compiler.disable(lambda *_: time.sleep(0.002)), prepend=True)
    for s in shapes:  # compile each shape before the threads start
        call(compiled, *batch(*s))
    got = run_in_threads(lambda ids, mask: call(compiled, ids, mask)[:compare], jobs)
    for t in range(2):
        for i in range(15):
            assert_same(got[t][i], want[t][i][:compare], f"thread {t} call {i}")


@pytest.mark.parametrize("compile_in_place", [False, True], ids=["torch_compile", "module_compile"])
@pytest.mark.parametrize("router", ["token_gate", "sentence_gate"])
def test_compiled_model_shared_by_threads_adds_each_calls_aux_loss_to_its_loss(router, compile_in_place):
    test_compiled_model_shared_by_threads(router, compile_in_place=compile_in_place, widen_race=True)


def test_a_compiled_call_that_raises_gives_its_turn_back():
    torch._dynamo.reset()
    model = patched("bert", "token_gate", aux_loss_coef=0.5).eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    ids, mask = batch()
    want = call(model, ids, mask)
    call(compiled, ids, mask)
    with pytest.raises(IndexError):  # a token id outside the embedding table, raised inside the compiled forward
        compiled(input_ids=torch.full_like(ids, V + 5), attention_mask=mask, labels=labels_for(ids))
    got = []
    other = threading.Thread(target=lambda: got.append(call(compiled, ids, mask)), daemon=True)
    other.start()
    other.join(timeout=120)
    assert not other.is_alive(), "another thread's compiled call waited for a turn the failed call kept"
    assert_same(got[0], want, "the next call")


def test_a_model_with_aux_loss_inlined_into_a_larger_compiled_graph_adds_its_aux_loss():
    # Traced inside another module's frame, the model's hooks are inlined: no turn to take, no graph break.
    torch._dynamo.reset()
    model = patched("bert", "token_gate", aux_loss_coef=0.5).eval()

    class Caller(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids, mask):
            return self.model(input_ids=ids, attention_mask=mask, labels=labels_for(ids)).loss

    ids, mask = batch()
    want = call(model, ids, mask)[1]
    got = torch.compile(Caller(), fullgraph=True, backend="eager")(ids, mask)
    torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
@pytest.mark.parametrize("router", ["hash", "sentence_gate"])
def test_a_call_made_inside_a_call_of_the_same_model_leaves_the_outer_call_its_plans(family, router):
    model = patched(family, router).eval()
    a, b = batch(3, 9), batch(2, 7)
    want_a, want_b = call(model, *a), call(model, *b)
    inner = []

    def call_again(*_):
        if not inner:  # once: the inner call runs this hook too
            inner.append(None)
            inner[0] = call(model, *b)

    mk.moe_layers(model)[1].register_forward_pre_hook(call_again)
    assert_same(call(model, *a), want_a, "outer call")
    assert_same(inner[0], want_b, "inner call")


def test_a_call_that_fails_in_its_pre_hook_leaves_no_call_behind():
    model = patched("bert", "hash").eval()
    ids, mask = batch()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(input_ids=torch.full_like(ids, V + 5), attention_mask=mask)
    with pytest.raises(ValueError, match="outside its model's forward"):
        mk.moe_layers(model)[0](torch.randn(*ids.shape, 32))
    assert_same(call(model, ids, mask), call(copy.deepcopy(model), ids, mask), "the next call")


# -- activation checkpointing ------------------------------------------------------------------
def grads_after(model, batches):
    model.zero_grad(set_to_none=True)
    loss = 0
    for ids, mask in batches:
        out = model(input_ids=ids, attention_mask=mask, labels=labels_for(ids))
        loss = loss + out.loss
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family, forwards", [("bert", 1), ("bert", 2), ("bert", 3), ("distilbert", 2),
                                              ("modernbert", 2)])
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointed_gradients_with_several_forwards_per_backward(family, forwards, router, reentrant):
    # Reentrant checkpointing runs the first forward without grad, so the gates' aux loss has no graph there.
    coef = 0.5 if router.endswith("gate") and not reentrant else 0.0
    model = no_dropout(patched(family, router, **({"aux_loss_coef": coef} if coef else {}))).train()
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing_enable({"use_reentrant": reentrant})
    runs = []
    for m in mk.moe_layers(ckpt):
        m.register_forward_pre_hook(lambda *_: runs.append(1))
    batches = [batch(*SHAPES[i]) for i in range(forwards)]
    want, got = grads_after(model, batches), grads_after(ckpt, batches)
    assert len(runs) == 2 * forwards * len(mk.moe_layers(ckpt))  # every layer ran again in backward
    assert want.keys() == got.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    assert all(m.w1.grad.abs().sum() > 0 for m in mk.moe_layers(ckpt))
    if router.endswith("gate"):
        assert all(m.router.proj.weight.grad.abs().sum() > 0 for m in mk.moe_layers(ckpt))


@pytest.mark.parametrize("router", ["hash", "token_gate"])
def test_checkpointing_the_whole_model_with_two_forwards_per_backward(router):
    from torch.utils.checkpoint import checkpoint

    model = no_dropout(patched("bert", router)).train()
    twin = copy.deepcopy(model)
    batches = [batch(3, 9), batch(2, 7)]

    def loss_of(m, ids, mask):
        return m(input_ids=ids, attention_mask=mask, labels=labels_for(ids)).loss

    sum(loss_of(model, *b) for b in batches).backward()
    sum(checkpoint(loss_of, twin, *b, use_reentrant=False) for b in batches).backward()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_a_recompute_that_lost_its_call_says_so():
    """A layer checkpointed by hand, outside the model's own checkpointing, is recomputed in backward
    after its call has ended: it must not guess a plan."""
    from torch.utils.checkpoint import checkpoint

    model = no_dropout(patched("bert", "hash")).train()
    layer = model.bert.encoder.layer[0]
    layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    ids, mask = batch()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels_for(ids)).loss
    with pytest.raises(ValueError, match="recomputed in backward"):
        loss.backward()

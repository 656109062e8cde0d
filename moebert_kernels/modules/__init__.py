"""nn.Modules over ops."""
from .distill import DistillationLoss, DistillOutput
from .moe import DeferredExpertLayerNorm, MoEFeedForward
from .quantized import QuantizedMoEFeedForward
from .routers import BalancedHashRouter, GateOutput, HashRouter, SentenceGate, TokenGate, switch_load_balancing_loss
from .routing_state import RoutingState

__all__ = ["BalancedHashRouter", "DeferredExpertLayerNorm", "GateOutput", "HashRouter", "MoEFeedForward",
           "RoutingState", "SentenceGate", "TokenGate", "switch_load_balancing_loss"]
__all__ += ["DistillationLoss", "DistillOutput"]
__all__ += ["QuantizedMoEFeedForward"]

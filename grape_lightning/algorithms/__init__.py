"""One LightningModule per algorithm."""

from grape_lightning.algorithms.base import PolicyModule
from grape_lightning.algorithms.cispo import CISPOModule
from grape_lightning.algorithms.distillation import OnPolicyDistillationModule
from grape_lightning.algorithms.dpo import DPOModule
from grape_lightning.algorithms.grape import GRAPEModule
from grape_lightning.algorithms.grpo import GRPOModule
from grape_lightning.algorithms.gspo import GSPOModule
from grape_lightning.algorithms.on_policy import OnPolicyModule
from grape_lightning.algorithms.optim import OptimizerConfig
from grape_lightning.algorithms.ppo import PPOModule
from grape_lightning.algorithms.reinforce import REINFORCEModule
from grape_lightning.algorithms.rejection_sampling import RejectionSamplingModule
from grape_lightning.algorithms.reward_model import RewardModelModule
from grape_lightning.algorithms.sft import SFTModule
from grape_lightning.algorithms.surrogate_update import SurrogateConfig
from grape_lightning.algorithms.trpo import TRPOModule
from grape_lightning.algorithms.update_loop import UpdateConfig
from grape_lightning.advantages import AdvantageConfig
from grape_lightning.losses.mismatch import MismatchCorrection
from grape_lightning.rollout.dynamic_sampling import DynamicSamplingConfig
from grape_lightning.rollout.off_policy import OffPolicyConfig

__all__ = [
    "AdvantageConfig", "DynamicSamplingConfig", "SurrogateConfig", "UpdateConfig", "CISPOModule", "DPOModule", "GRAPEModule",
    "GRPOModule", "GSPOModule", "MismatchCorrection", "OffPolicyConfig", "OnPolicyDistillationModule", "OnPolicyModule",
    "OptimizerConfig", "PolicyModule", "PPOModule", "REINFORCEModule",
    "RejectionSamplingModule", "RewardModelModule", "SFTModule", "TRPOModule",
]

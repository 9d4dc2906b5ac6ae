"""knobgym environments. ``import envs`` registers every env id with Gymnasium."""

from envs.budget import Budget, parse_budget_ms
from envs.registry import check_env_id, list_envs, register_env
from envs.reward import RewardConfig, compute_reward, compute_rewards

__all__ = ["Budget", "parse_budget_ms", "RewardConfig", "compute_reward", "compute_rewards",
           "register_env", "list_envs", "check_env_id"]

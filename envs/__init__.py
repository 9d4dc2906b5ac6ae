"""knobgym environments. ``import envs`` registers every env id with Gymnasium.

>>> import gymnasium as gym, envs
>>> env = gym.make("MultiKnob-v0", budget="auto")          # tiny default backend; or "50%", "45ms"
>>> envs.list_envs()
"""

from envs.budget import Budget
from envs.multiknob import MultiKnobEnv
from envs.protocols import GroupEnv, group_env
from envs.registry import check_env_id, list_envs, register_env
from envs.reward import RewardConfig, compute_reward, compute_rewards
from envs.token_budget import TokenBudgetEnv

register_env("MultiKnob-v0", MultiKnobEnv, description="two-stage: vision tier, then MoE top-k and depth")
register_env("MultiKnob-measured-v0", MultiKnobEnv, nondeterministic=True, latency="measured",
             description="MultiKnob-v0 with wall-clock latency")
register_env("TokenBudget-v0", TokenBudgetEnv, description="one step: fraction of vision tokens kept")
register_env("TokenBudget-measured-v0", TokenBudgetEnv, nondeterministic=True, latency="measured",
             description="TokenBudget-v0 with wall-clock latency")

from envs.decoding import DecodingEnv  # noqa: E402

register_env("Decoding-v0", DecodingEnv, description="one step: decoding strategy, beams, temperature, "
             "draft lookahead, chat template")
register_env("Decoding-measured-v0", DecodingEnv, nondeterministic=True, latency="measured",
             description="Decoding-v0 with wall-clock latency")

# KV-cache policy envs: StreamingKV-v0 and one KV-<Policy>-v0 per registered policy (a loop over
# the policy registry; call register_kv_envs() again after registering a policy later).
from envs.budget import KVBudget  # noqa: E402
from envs.kv_registration import register_kv_env, register_kv_envs  # noqa: E402
from envs.streaming_kv import StreamingKVEnv  # noqa: E402

register_kv_envs()

__all__ = ["Budget", "GroupEnv", "group_env", "RewardConfig", "compute_reward", "compute_rewards",
           "register_env", "list_envs", "check_env_id", "MultiKnobEnv", "TokenBudgetEnv", "DecodingEnv"]

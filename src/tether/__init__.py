"""tether: PPO with a leash for causal and seq2seq language models.

Library entry points (the CLI is a thin layer over these):
    - `tether.config.TrainConfig` and `tether.trainer.train` run PPO;
    - `tether.policy.Policy` wraps a Hugging Face model with LoRA, a value head and a shared reference;
    - `tether.ppo` and `tether.losses` hold the pure tensor math; `tether.kl` the KL controllers;
    - `tether.rewards.load_reward` and `tether.data.load_prompts` parse reward and prompt specs.
"""

__version__ = "0.1.0"

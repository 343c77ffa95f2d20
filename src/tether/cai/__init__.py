"""Constitutional AI (Bai et al. 2022, arXiv 2212.08073), ending in PPO against the AI-trained
preference model, as the original method does.

Stages, each a library call and a `tether cai` subcommand, each writing one subdirectory of the
pipeline directory (see pipeline.py):

1. revise    red-team prompt -> answer -> K x (critique under a sampled principle -> revision)
2. sft       SL-CAI: LoRA supervised fine-tuning on (prompt, final revision)
3. feedback  two SL-CAI answers per prompt; a feedback model's multiple-choice probabilities
             "(A) or (B)?" become a soft preference label
4. train-pm  a Bradley-Terry preference model on those pairs (= `tether train-rm`)
5. rl        RL-CAI: PPO against pm:DIR with the KL leash to the SL-CAI model
6. eval      base vs SL-CAI vs RL-CAI on held-out red-team prompts and harmless prompts
"""

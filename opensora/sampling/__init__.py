"""Inference-time pieces of Open-Sora 1.1 that a sample task composes: conditioning on reference
images / videos (the mask-strategy grammar, `conditioning`), the prompt syntax (JSON options, per-loop
prompts, `prompts`) and loop generation of long videos (`loop`). The sampler side (frame masks in
IDDPM) is in opensora.scheduler."""
from opensora.sampling.conditioning import (MaskInsertion, MaskStrategyError, apply_mask_strategy,
                                            parse_mask_strategy)
from opensora.sampling.loop import LoopOutput, generate_loop, loop_video_length
from opensora.sampling.prompts import PromptPlan, PromptSyntaxError, plan_prompts, split_loop_prompts, \
    split_prompt_options

__all__ = ["LoopOutput", "MaskInsertion", "MaskStrategyError", "PromptPlan", "PromptSyntaxError",
           "apply_mask_strategy", "generate_loop", "loop_video_length", "parse_mask_strategy", "plan_prompts",
           "split_loop_prompts", "split_prompt_options"]

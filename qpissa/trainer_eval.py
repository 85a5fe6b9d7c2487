"""The Trainer whose evaluations weigh every trained token alike, as training and `qpissa eval` do.

transformers (5.2x) averages each evaluation batch's mean loss, so its `eval_loss` moves with how tokens
fall into batches (per_device_eval_batch_size, sample lengths), and `load_best_model_at_end` chose the
adapter by that number. Here each batch's loss is a mean over its own tokens, weighed by their count.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from qpissa.data import IGNORE_INDEX


class TokenWeightedTrainer(Trainer):
    """transformers' Trainer with `eval_loss` the mean over every evaluated token."""

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        self._eval_sums = torch.zeros(2, dtype=torch.float64, device=self.args.device)  # loss sum, tokens
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        # each process holds its shard's sums (a sample the sampler repeats to even out the shards counts
        # twice here, where the Trainer's own mean drops it: at most one per process)
        total, tokens = self.accelerator.reduce(self._eval_sums, reduction="sum").tolist()
        if tokens:
            output.metrics[f"{metric_key_prefix}_loss"] = total / tokens
        return output

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        if model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # without num_items_in_batch the model's loss is this batch's mean over its own target tokens
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
        tokens = (inputs["labels"][..., 1:] != IGNORE_INDEX).sum()  # position t predicts token t+1
        self._eval_sums += torch.stack([loss.detach().double() * tokens, tokens.double()])
        return (loss, outputs) if return_outputs else loss

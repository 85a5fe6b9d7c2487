"""The Trainer whose evaluations weigh every trained token alike, as training and `qpissa eval` do.

transformers (5.2x) averages each evaluation batch's mean loss, so its `eval_loss` moves with how tokens
fall into batches (per_device_eval_batch_size, sample lengths), and `load_best_model_at_end` chose the
adapter by that number. Here each sample's summed loss and token count are gathered from every process,
without the samples the sampler repeats to even out the processes' last batches, and `eval_loss` is
their ratio.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from qpissa.task_eval import sample_sums


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
        total, tokens = self._eval_sums.tolist()
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
        outputs = model(**{key: value for key, value in inputs.items() if key != "labels"})
        sums = sample_sums(outputs.logits, inputs["labels"], inputs.get("position_ids"))
        # every process adds the same gathered sums; gather_for_metrics drops the repeated samples
        self._eval_sums += self.accelerator.gather_for_metrics(sums).sum(0)
        loss = sums[:, 0].sum() / sums[:, 1].sum().clamp(min=1)  # this batch's own mean
        return (loss, outputs) if return_outputs else loss

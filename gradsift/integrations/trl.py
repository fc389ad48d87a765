"""``GradSiftSFTTrainer``: TRL's ``SFTTrainer`` with gradsift's selection step.

TRL prepares the data (text, prompt-completion or messages rows; chat templates; completion
masks turned into ``labels``), and gradsift selects within each per-device batch, exactly as
``GradSiftTrainer`` does for a plain ``Trainer``. The target set goes through the same TRL
pipeline, so it may have the training data's shape, raw or tokenized.

Packing and padding-free batches put several documents in one row, which would make one
"candidate" out of many; they are refused at start.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trl import SFTTrainer

from gradsift.data import Example
from gradsift.integrations.transformers import GradSiftTrainer, _as_example


class GradSiftSFTTrainer(GradSiftTrainer, SFTTrainer):
    """``SFTTrainer`` whose every step trains on a gradsift-selected weighted subset.

    Takes ``SFTTrainer``'s arguments plus ``GradSiftTrainer``'s (``target_dataset``,
    ``selector``, ``budget_per_step``, ...). ``target_dataset`` is a ``datasets.Dataset`` (or a
    list of rows) in any shape ``SFTTrainer`` accepts.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        args_ = kwargs.get("args", args[1] if len(args) > 1 else None)
        for flag in ("packing", "padding_free"):
            if getattr(args_, flag, False):
                raise ValueError(
                    f"GradSiftSFTTrainer does not support {flag}=True: a packed or padding-free "
                    "row holds several documents, and gradsift selects whole rows. Set "
                    f"{flag}=False in the SFTConfig")
        super().__init__(*args, **kwargs)

    def prepare_target(self, target_dataset: Sequence[Any]) -> list[Example]:
        """The target rows through TRL's own preparation (tokenization, chat template,
        completion-only labels, truncation), then as examples."""
        import datasets

        data = (target_dataset if isinstance(target_dataset, datasets.Dataset)
                else datasets.Dataset.from_list(list(target_dataset)))
        if "input_ids" not in data.column_names or "labels" not in data.column_names:
            data = self._prepare_dataset(data, self.processing_class, self.args, False,
                                         None, "target")
        return [_as_example(row, i) for i, row in enumerate(data)]

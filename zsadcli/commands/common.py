"""Options every command accepts, both before the subcommand (``zsad --device cpu predict``)
and after it (``zsad predict --device cpu``); the later one wins."""
from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass, replace
from typing import Annotated, Callable, Optional, TypeVar

import typer

from zsadcli.console import log, set_quiet
from zsadcli.core.limits import MAX_IMAGE_SIZE
from zsadcli.errors import ZsadError

F = TypeVar("F", bound=Callable)


def guard(command: F) -> F:
    """Turn a ZsadError into its message on stderr and its exit code (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from zsadcli.core.distributed import finish, is_writer

        try:
            result = command(*args, **kwargs)
            finish()  # under torchrun: every rank leaves together
            return result
        except ZsadError as exc:
            if is_writer():  # under torchrun every rank raises the same error; rank 0 says it once
                exc.show()
                if _resumable():
                    _resumable().note_kept()
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM during a resumable eval
            stopped = _resumable().interrupted() if _resumable() else None
            if stopped is None:
                raise
            if is_writer():
                stopped.show()
            raise typer.Exit(stopped.exit_code) from None
        finally:
            if _resumable():
                _resumable().release()

    return wrapper  # type: ignore[return-value]


def _resumable():
    """zsadcli.core.resumable if this command opened a resumable run (only then is it imported)."""
    import sys

    return sys.modules.get("zsadcli.core.resumable")

DeviceOpt = Annotated[Optional[str], typer.Option(
    "--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.", show_default=False)]
PrecisionOpt = Annotated[Optional[str], typer.Option(
    "--precision", help="fp32 (exact, the parity setting), bf16 (fast on CPU and GPU) or fp16 (GPU).",
    show_default=False)]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed (default: the method's recipe).",
                                                min=0, max=2**32 - 1, show_default=False)]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable results on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No logs or progress bars on stderr.")]
MaxImagePixelsOpt = Annotated[Optional[int], typer.Option(
    "--max-image-pixels", min=1, help="Largest image (width x height) zsad decodes; default 178,956,970 or "
                                      "$ZSAD_MAX_IMAGE_PIXELS (a guard against decompression bombs). Give it "
                                      "before the command: zsad --max-image-pixels N predict ...",
    show_default=False)]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", help="Data-loading processes (per rank under torchrun); 0 decodes in the main process. "
                      "Default: min(4, CPUs - 1). Results are the same for every value.", min=0, show_default=False)]


def finite_float(minimum: Optional[float] = None, *, strictly_above: bool = False) -> Callable:
    """A Typer callback refusing NaN/inf and values below ``minimum`` (exit 2 naming the range);
    None (not given) passes through, 0 is a value like any other."""

    def check(ctx: typer.Context, param: typer.CallbackParam, value: Optional[float]) -> Optional[float]:
        if value is None:
            return None
        low_ok = minimum is None or (value > minimum if strictly_above else value >= minimum)
        if value != value or value in (float("inf"), float("-inf")) or not low_ok:
            bound = "" if minimum is None else f" {'>' if strictly_above else '>='} {minimum:g}"
            raise typer.BadParameter(f"{value} is not a finite number{bound}.")
        return value

    return check


def comma_list(value: Optional[str], option: str) -> list[str]:
    """``"a, b,a"`` -> ``["a", "b"]``: names stripped, empty ones dropped, repeats kept once (with a note)."""
    names = [part.strip() for part in (value or "").split(",") if part.strip()]
    unique = list(dict.fromkeys(names))
    if len(unique) < len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        from rich.markup import escape

        log(f"note: {option} names {escape(', '.join(repeated))} more than once; each is used once")
    return unique


@dataclass(frozen=True)
class GlobalOptions:
    device: str = "auto"
    precision: str = "fp32"
    seed: Optional[int] = None
    json: bool = False
    quiet: bool = False
    max_image_pixels: Optional[int] = None  # root option only (`zsad --max-image-pixels N CMD`)
    precision_given: bool = False  # --precision was on the command line (an exported model's default differs)


def merge_options(ctx: typer.Context, *, device: Optional[str] = None, precision: Optional[str] = None,
                  seed: Optional[int] = None, json: bool = False, quiet: bool = False,
                  max_image_pixels: Optional[int] = None) -> GlobalOptions:
    """The root callback's options overridden by what the subcommand was given."""
    base = ctx.find_root().obj if isinstance(ctx.find_root().obj, GlobalOptions) else GlobalOptions()
    merged = replace(base,
                     device=device or base.device,
                     precision=precision or base.precision,
                     seed=seed if seed is not None else base.seed,
                     json=json or base.json,
                     quiet=quiet or base.quiet,
                     max_image_pixels=max_image_pixels if max_image_pixels is not None else base.max_image_pixels,
                     precision_given=bool(precision) or base.precision_given)
    from zsadcli.core.distributed import is_writer

    set_quiet(merged.quiet or not is_writer())  # under torchrun only rank 0 logs and shows progress
    from zsadcli.data.images import set_max_image_pixels

    set_max_image_pixels(merged.max_image_pixels)
    if device:
        from zsadcli.core.devices import resolve_device

        resolve_device(device)  # an absent device is a usage error before any work starts
    return merged


# ---------------------------------------------------------------- method selection (predict/eval/train/ablate/...)
# The method/weight options are declared once, here, and attached to a command by
# ``@method_options(...)``: the command receives them as one ``MethodOptions`` value.
MethodOpt = Annotated[str, typer.Option("--method", "-m", help="Method name (e.g. anomalyclip).")]
CheckpointOpt = Annotated[Optional[str], typer.Option(
    "--checkpoint", help="Prompt/adapter weights: a zsad .safetensors or the authors' released .pth.",
    show_default=False)]
TrainOnOpt = Annotated[Optional[str], typer.Option(
    "--train-on", help="Use the authors' released weights trained on this dataset (e.g. mvtec, visa).",
    show_default=False)]
BackboneOpt = Annotated[Optional[str], typer.Option(
    "--backbone", help="Backbone: a weights.yaml key or hf-hub:org/name[@rev] (default: the method's).",
    show_default=False)]
BackboneFileOpt = Annotated[Optional[str], typer.Option(
    "--backbone-file", help="Local CLIP weights (OpenAI .pt, open_clip .bin/.safetensors); shapes decide the "
                            "architecture.", show_default=False)]
ImageSizeOpt = Annotated[Optional[int], typer.Option(
    "--image-size", min=1, max=MAX_IMAGE_SIZE,
    help=f"Input size in pixels: a multiple of the backbone's patch size (14 or 16), at most {MAX_IMAGE_SIZE} "
         "(default: the method's, e.g. 518).", show_default=False)]
AblateOpt = Annotated[Optional[list[str]], typer.Option(
    "--ablate", help="Turn a module off (repeatable; see `zsad ablate --method M --list`).", show_default=False)]

# Method-specific options: each maps onto a hyperparameter the method declares; a method
# that does not declare it rejects it (exit 2), so nothing is silently ignored.
ClassNameOpt = Annotated[Optional[str], typer.Option(
    "--class-name", help="Object name for class-aware prompts (WinCLIP, CLIP-AD, April-GAN); default: the dataset's class, "
                         "'object' for predict.", show_default=False)]
RepVecOpt = Annotated[Optional[str], typer.Option(
    "--rep-vec", help="CLIP-AD representative vectors: mean, pca, kde, dbscan or mean_shift.", show_default=False)]
DinoFileOpt = Annotated[Optional[str], typer.Option(
    "--dino-file", help="Crane+: local DINOv2 ViT-B/14-reg weights (facebookresearch key names).",
    show_default=False)]
DattnMeanOpt = Annotated[Optional[str], typer.Option(
    "--dattn-mean", help="Crane+ D-Attn centring: image (per image, default) or batch (the authors').",
    show_default=False)]
NoBsrOpt = Annotated[bool, typer.Option("--no-bsr", help="BSR-CLIP: turn the whole BSR chain off.")]
FixNormalPromptOpt = Annotated[bool, typer.Option(
    "--fix-normal-prompt", help="ViP²-CLIP: build the normal prompt with 'good' (the official one says 'damaged').")]
ReferenceOpt = Annotated[Optional[str], typer.Option(
    "--reference", help="Few-shot (WinCLIP, April-GAN): a folder of normal reference images.", show_default=False)]
AllowPickleOpt = Annotated[bool, typer.Option(
    "--allow-pickle", help="Read authors' whole-object pickles (BSR-CLIP's Adaptor) through an allowlist: "
                           "torch tensors and the known classes only; any other object is refused unrun.")]
HparamOpt = Annotated[Optional[list[str]], typer.Option(
    "--hparam", help="Override a method hyperparameter, KEY=VALUE (repeatable; VALUE parsed as YAML).",
    show_default=False)]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", help="Run an exported model folder (`zsad export`) with OpenVINO or ONNX Runtime instead of torch; "
                    "it fixes the method and its weights.", show_default=False)]


@dataclass(frozen=True)
class MethodOptions:
    """The method/weight options as one value; a command that did not declare an option sees its default."""

    method: str = "anomalyclip"
    checkpoint: Optional[str] = None
    train_on: Optional[str] = None
    backbone: Optional[str] = None
    backbone_file: Optional[str] = None
    image_size: Optional[int] = None
    ablate: Optional[list[str]] = None
    class_name: Optional[str] = None
    rep_vec: Optional[str] = None
    dino_file: Optional[str] = None
    dattn_mean: Optional[str] = None
    no_bsr: bool = False
    fix_normal_prompt: bool = False
    reference: Optional[str] = None
    allow_pickle: bool = False
    hparam: Optional[list[str]] = None
    model: Optional[str] = None
    given: frozenset[str] = frozenset()  # the options given on the command line (set by @method_options)

    def conflicts_with_model(self) -> list[str]:
        """The options given beside --model: an exported model fixes all of them."""
        defaults = MethodOptions()
        return [f"--{name.replace('_', '-')}" for name in _METHOD_OPTION_DECLARATIONS
                if name != "model" and (name in self.given or getattr(self, name) != getattr(defaults, name))]

    def refuse_model(self, command: str, why: str) -> None:
        """For commands that cannot run an exported model (e.g. ablate): exit 2 when --model is given."""
        if self.model:
            from zsadcli.errors import BadInput

            raise BadInput(f"`zsad {command}` does not take --model: {why}.",
                           hint="give --method and its weights (--checkpoint / --train-on) instead")

    def hparams(self) -> dict:
        """The hyperparameter overrides the method-specific options and --hparam stand for."""
        return method_hparams(rep_vec=self.rep_vec, dino_file=self.dino_file, dattn_mean=self.dattn_mean,
                              no_bsr=self.no_bsr, fix_normal_prompt=self.fix_normal_prompt,
                              reference=self.reference, hparam=self.hparam)

    def spec(self, opts: GlobalOptions, *, require_weights: bool = True, extra_hparams: Optional[dict] = None,
             ablate: Optional[list[str]] = None):
        """The MethodSpec these options describe (``ablate`` overrides --ablate, e.g. for ablation variants).
        With --model: a spec naming the exported folder; any weight/method option beside it is exit 2."""
        if self.model:
            return exported_model_spec(opts, self, extra_hparams=extra_hparams)
        return method_spec(opts, method=self.method, checkpoint=self.checkpoint, train_on=self.train_on,
                           backbone=self.backbone, backbone_file=self.backbone_file, image_size=self.image_size,
                           ablate=self.ablate if ablate is None else ablate, require_weights=require_weights,
                           hparams=self.hparams() | (extra_hparams or {}), class_name=self.class_name,
                           allow_pickle=self.allow_pickle)


# name -> (annotation, default): the one declaration every command's method options come from.
_METHOD_OPTION_DECLARATIONS: dict[str, tuple[object, object]] = {
    "method": (MethodOpt, "anomalyclip"),
    "checkpoint": (CheckpointOpt, None),
    "train_on": (TrainOnOpt, None),
    "backbone": (BackboneOpt, None),
    "backbone_file": (BackboneFileOpt, None),
    "image_size": (ImageSizeOpt, None),
    "ablate": (AblateOpt, None),
    "class_name": (ClassNameOpt, None),
    "rep_vec": (RepVecOpt, None),
    "dino_file": (DinoFileOpt, None),
    "dattn_mean": (DattnMeanOpt, None),
    "no_bsr": (NoBsrOpt, False),
    "fix_normal_prompt": (FixNormalPromptOpt, False),
    "reference": (ReferenceOpt, None),
    "allow_pickle": (AllowPickleOpt, False),
    "hparam": (HparamOpt, None),
    "model": (ModelOpt, None),
}


def method_options(*, exclude: frozenset[str] | set[str] = frozenset(), into: str = "method_options") -> Callable[[F], F]:
    """Attach the method/weight options (all but ``exclude``) to a command; the command takes them as one
    ``MethodOptions`` argument named ``into``. Typer reads the rewritten signature, so ``--help`` lists
    them like any other option."""
    unknown = set(exclude) - set(_METHOD_OPTION_DECLARATIONS)
    if unknown:
        raise ValueError(f"unknown method options {sorted(unknown)}")
    names = [n for n in _METHOD_OPTION_DECLARATIONS if n not in exclude]

    def decorate(command: F) -> F:
        hints = typing.get_type_hints(command, include_extras=True)
        own = inspect.signature(command)
        if into not in own.parameters:
            raise TypeError(f"{command.__name__} must take a `{into}: MethodOptions` parameter")
        params = []
        for p in own.parameters.values():
            if p.name == into:
                params.extend(inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY,
                                                default=_METHOD_OPTION_DECLARATIONS[n][1],
                                                annotation=_METHOD_OPTION_DECLARATIONS[n][0]) for n in names)
            else:
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation)))

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            context = next((a for a in [*args, *kwargs.values()] if hasattr(a, "get_parameter_source")), None)
            chosen = MethodOptions(**{n: kwargs.pop(n) for n in names if n in kwargs},
                                   given=_given_options(context, names))
            return command(*args, **kwargs, **{into: chosen})

        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # Typer must read the rewritten signature, not the command's own
        return wrapper  # type: ignore[return-value]

    return decorate


def _given_options(ctx, names: list[str]) -> frozenset[str]:
    """Which of ``names`` the command line set (not their defaults); empty without the command's
    (typer/click) context."""
    if ctx is None:
        return frozenset()
    sources = {n: ctx.get_parameter_source(n) for n in names}
    return frozenset(n for n, source in sources.items() if source is not None and source.name != "DEFAULT")


def exported_model_spec(opts: GlobalOptions, options: MethodOptions, *, extra_hparams: Optional[dict] = None):
    """The MethodSpec of ``--model DIR``: the folder decides the method, weights and settings, the
    runtime runs on the CPU; --precision (if given) picks the runtime's precision."""
    from zsadcli.core.engine import MethodSpec
    from zsadcli.errors import BadInput

    conflicts = options.conflicts_with_model() + (
        [f"settings {', '.join(sorted(extra_hparams))}"] if extra_hparams else [])
    if conflicts:
        raise BadInput(f"--model {options.model} runs an exported model, which fixes the method, its weights and "
                       f"settings; {', '.join(conflicts)} cannot change it.",
                       hint="drop those options, or export another model with them (`zsad export`)")
    if (opts.device or "auto") not in ("auto", "cpu"):
        raise BadInput(f"--device {opts.device}: exported models run on the CPU (OpenVINO / ONNX Runtime).",
                       hint="use --device cpu, or run the torch method (--method) on that device")
    import torch

    from zsadcli.core.runtime import read_model_card

    method = read_model_card(options.model, verify=False).method  # a folder that is not an export: exit 2 here
    return MethodSpec(method=method, model=options.model, device=torch.device("cpu"),
                      runtime_precision=opts.precision if opts.precision_given else None)


def method_hparams(*, rep_vec: Optional[str] = None, dino_file: Optional[str] = None,
                   dattn_mean: Optional[str] = None, no_bsr: bool = False, fix_normal_prompt: bool = False,
                   reference: Optional[str] = None, hparam: Optional[list[str]] = None) -> dict:
    """The hyperparameter overrides the method-specific options stand for."""
    import yaml

    from zsadcli.errors import BadInput

    values: dict = {}
    for item in hparam or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"--hparam {item!r}: expected KEY=VALUE.")
        try:
            values[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            problem = str(getattr(exc, "problem", None) or "not valid YAML")
            raise BadInput(f"--hparam {key.strip()}: {raw!r} is not a valid YAML value ({problem}).",
                           hint="e.g. --hparam sigma=4 or --hparam 'layers=[6, 12]'") from None
    named = {"rep_vec": rep_vec, "dino_file": dino_file, "dattn_mean": dattn_mean, "reference": reference,
             "bsr": False if no_bsr else None, "fix_normal_prompt": True if fix_normal_prompt else None}
    values.update({k: v for k, v in named.items() if v is not None})
    return values


def method_spec(opts: GlobalOptions, *, method: str, checkpoint: Optional[str] = None, train_on: Optional[str] = None,
                backbone: Optional[str] = None, backbone_file: Optional[str] = None, image_size: Optional[int] = None,
                ablate: Optional[list[str]] = None, require_weights: bool = True, hparams: Optional[dict] = None,
                class_name: Optional[str] = None, allow_pickle: bool = False):
    """A MethodSpec from command-line options, with device and precision resolved."""
    from zsadcli.core.devices import resolve_device, resolve_precision
    from zsadcli.core.engine import MethodSpec

    if checkpoint and train_on:
        raise typer.BadParameter("give --checkpoint or --train-on, not both")
    device = resolve_device(opts.device)
    return MethodSpec(method=method, backbone=backbone, backbone_file=backbone_file, checkpoint=checkpoint,
                      train_on=train_on, image_size=image_size, ablate=frozenset(ablate or ()),
                      device=device, dtype=resolve_precision(opts.precision, device),
                      require_weights=require_weights, hparams=dict(hparams or {}), class_name=class_name,
                      allow_pickle=allow_pickle)

"""The ``medrpn`` command.

``medrpn fit|validate|test|predict`` are Lightning CLI subcommands driven by YAML configs
(``medrpn fit --config configs/demo.yaml``); ``medrpn synth`` writes the built-in synthetic
dataset; ``medrpn infer`` runs batch inference over scan folders; ``medrpn froc`` scores its results
against LUNA16 annotations; ``medrpn anchors analyze|plan``
inspects and plans anchor sets. The CLI only parses arguments and calls the same functions the
tests and notebooks call.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from medrpn.inference.precision import cpu_has_native_bf16
from medrpn.inference.writer import ScanPredictionWriter
from medrpn.training.checkpointing import BestAndLastCheckpoint

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

USAGE = """usage: medrpn <command> [options]

commands:
  synth      write the built-in synthetic chest-CT lesion dataset (NIfTI, DICOM, annotations)
  fit        train a detector from a YAML config (Lightning CLI)
  validate   evaluate a checkpoint on the validation split (FROC/CPM table)
  test       evaluate a checkpoint on the test split
  predict    run prediction through Lightning with the prediction writer
  infer      batch inference over folders of scans, writing overlays for review
  froc       score results (an infer output folder or candidates.csv) against LUNA16 annotations
  anchors    anchor coverage analysis and planning

`medrpn <command> --help` shows the options of a command.
"""


def resolve_precision(precision: str | int | None, accelerator: str | None) -> tuple[str | int | None, str | None]:
    """Keep ``bf16-mixed`` on a CPU only where the CPU has native bfloat16 instructions.

    With them (AVX512-BF16/AMX), CPU bf16 autocast with channels-last makes the demo's training steps 1.82x faster
    (``benchmarks/train_speed.py``); without them bfloat16 is emulated and slower than float32, so a config
    written for such a machine would silently run slower elsewhere. GPU runs are left alone.

    Args:
        precision: the trainer's ``precision`` setting.
        accelerator: the trainer's ``accelerator`` setting (``"auto"`` counts as CPU when CUDA is absent).

    Returns:
        The precision to use and, when it was changed, the reason.
    """
    on_cpu = accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available())
    if str(precision) in ("bf16-mixed", "bf16") and on_cpu and not cpu_has_native_bf16():
        return "32-true", (
            f"trainer.precision={precision} asked for CPU bfloat16 autocast, but this CPU has no native bfloat16 "
            "(AVX512-BF16/AMX), where it is slower than float32: training in float32 (32-true) instead"
        )
    return precision, None


class MedrpnCLI(LightningCLI):
    """LightningCLI with medrpn's links and defaults.

    Preprocessing settings are linked from the datamodule into the model, so the checkpoint carries
    exactly what the training data went through; the best checkpoint is kept by validation CPM.
    ``predict`` writes through :class:`ScanPredictionWriter` (``--prediction_writer.output_dir OUT``),
    the same per-scan outputs as ``medrpn infer``.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Links between data and model, and the checkpoint callback."""
        for src, dst in (
            ("data.spacing_mm", "model.preprocessing.spacing_mm"),
            ("data.intensity", "model.preprocessing.intensity"),
            ("data.ct_window", "model.preprocessing.ct_window"),
            ("data.orientation", "model.preprocessing.orientation"),
            ("data.slice_context", "model.preprocessing.slice_context"),
            ("data.hessian_sigmas_mm", "model.preprocessing.hessian_sigmas_mm"),
            ("data.hessian_gain", "model.preprocessing.hessian_gain"),
        ):
            parser.link_arguments(src, dst)
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ScanPredictionWriter, "prediction_writer")
        parser.link_arguments("prediction_writer.output_dir", "data.predict_output")
        parser.link_arguments("prediction_writer.overwrite", "data.predict_overwrite")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/cpm",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:03d}-cpm{val/cpm:.3f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def before_instantiate_classes(self) -> None:
        """CPU ``bf16-mixed`` falls back to float32 without native bfloat16 (see :func:`resolve_precision`)."""
        config = self.config.get(str(self.subcommand)) if self.subcommand else self.config
        trainer = config.get("trainer") if config is not None else None
        if trainer is None:
            return
        precision, reason = resolve_precision(trainer.get("precision"), trainer.get("accelerator"))
        if reason is not None:
            rank_zero_warn(reason)
            trainer["precision"] = precision


def lightning_main(args: Sequence[str]) -> int:
    """Run a Lightning subcommand (``fit``, ``validate``, ``test``, ``predict``)."""
    from medrpn.data.datamodule import LesionDataModule
    from medrpn.module import LesionDetectionModule

    args = list(args)
    MedrpnCLI(
        LesionDetectionModule,
        LesionDataModule,
        # from the command line Lightning reads sys.argv itself (given both, it warns on every run)
        args=None if args == sys.argv[1:] else args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "medrpn", "default_env": False},
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch a ``medrpn`` subcommand.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        Process exit status.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "synth":
        from medrpn.data.synthetic import main as synth_main

        return synth_main(rest)
    if command in LIGHTNING_COMMANDS:
        return lightning_main(args)
    if command == "infer":
        from medrpn.inference.batch import infer_main

        return infer_main(rest)
    if command == "froc":
        from medrpn.evaluation.luna16 import froc_main

        return froc_main(rest)
    if command == "anchors":
        from medrpn.anchors_planning import anchors_main

        return anchors_main(rest)
    print(f"medrpn: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

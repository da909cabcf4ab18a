"""`hf-deepseek train ... --num-processes N`: the same training run on N GPUs of this host, through `accelerate launch`
with a shipped config (`trainers/accelerate/fsdp2.yaml` by default, `ddp.yaml`, or any accelerate config file).

Equivalent by hand: `accelerate launch --config_file <config> --num_processes N -m hf_deepseek.cli train ...`.
With `--expert-parallel` the run goes through torchrun instead (`parallel/training.py`, its own loop):
`torchrun --standalone --nproc-per-node N -m hf_deepseek.cli train ... --expert-parallel`.
"""

import subprocess
import sys
from pathlib import Path

ACCELERATE_CONFIGS_DIR = Path(__file__).parent / "accelerate"


def accelerate_config_path(name_or_path: str) -> Path:
    """A shipped accelerate config by name (`fsdp2`, `ddp`) or a YAML file by path."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = ACCELERATE_CONFIGS_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in ACCELERATE_CONFIGS_DIR.glob("*.yaml")))
    raise ValueError(f"no accelerate config {name_or_path!r}: give a YAML path or one of {names}")


def launch_command(stage: str, recipe: str, overrides: list[str], num_processes: int, config: str) -> list[str]:
    """The `accelerate launch` command line that runs `hf-deepseek train <stage>` in `num_processes` processes."""
    if num_processes < 1:
        raise ValueError(f"--num-processes must be at least 1, got {num_processes}")
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(accelerate_config_path(config)),
        "--num_processes", str(num_processes),
        "-m", "hf_deepseek.cli", "train", stage, "--recipe", recipe, *overrides,
    ]  # fmt: skip


def torchrun_command(stage: str, recipe: str, overrides: list[str], num_processes: int) -> list[str]:
    """The `torchrun` command line that runs `hf-deepseek train <stage> --expert-parallel` in `num_processes`
    processes of this host."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(num_processes),
        "-m", "hf_deepseek.cli", "train", stage, "--recipe", recipe, "--expert-parallel", *overrides,
    ]  # fmt: skip


def launch_training(args, extra: list[str]) -> None:
    """Run `hf-deepseek train` under accelerate, or torchrun with `--expert-parallel` (arguments from
    `hf_deepseek.cli`); exits with its status."""
    overrides = [*args.overrides, *extra]
    if args.expert_parallel:
        command = torchrun_command(args.stage, args.recipe, overrides, args.num_processes)
    else:
        command = launch_command(args.stage, args.recipe, overrides, args.num_processes, args.accelerate_config)
    print("launching:", " ".join(command), flush=True)
    raise SystemExit(subprocess.call(command))

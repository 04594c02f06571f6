"""The offline benchmark's presets, tasks and report questions, as data.

A :class:`Preset` names its tasks, rows (table rows: a registered method, one of its registered
variants, or the pixel baseline), seeds, size and whether learning rates are selected on val200.
``rows=None`` means every row (:func:`experiments.rows.every_row`): a method registered in its own
file appears with no edit here. Training defaults not named here (batch size, weight decay,
warm-up, normalization) are :class:`guft_jax.config.TrainConfig`'s, as for ``experiments.run``.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Task:
    """An offline dataset as the benchmark splits it.

    Attributes:
      name: the :func:`guft_jax.data.get_source` name.
      test_size: ``0``: the dataset's own test split; ``n``: a fixed subsample of ``n`` images.
    """

    name: str
    test_size: int = 0


@dataclasses.dataclass(frozen=True)
class Question:
    """A sentence-per-task comparison the report writes under the table.

    Attributes:
      row: the row compared.
      others: the rows it is compared with.
      title: the paragraph's heading (``{row}`` is filled in).
      budget: also require ``row`` to train no more parameters than the other row.
    """

    row: str
    others: tuple[str, ...]
    title: str
    budget: bool = False


@dataclasses.dataclass(frozen=True)
class Preset:
    """One benchmark configuration (command-line flags override the fields they name).

    Attributes:
      name: ``--preset``'s value; records carry it.
      tasks: task names (keys of :data:`TASKS`).
      rows: table rows in table order; ``None``: every row.
      seeds: the seeds of the final runs.
      epochs: training epochs of every run.
      image_size: input size in pixels.
      select: pick each row's lr factor on val200 (train800 -> val200, seed 0) before the final
        runs on train800val200; otherwise every row trains at its registered defaults.
      pack: runs of one row trained as one vmapped program (1: alone).
      pack_masks: pack rows that have a sparse path too (on their dense path).
      max_grid: ``> 0``: only the central ``max_grid`` factors of each grid (extended once past an
        edge that holds the best candidate).
      out: the default output folder.
      guft_path: ``"sparse"`` or ``"dense"``: the training path of methods with a ``sparse``
        option (``"dense"``: one compile per shape, shared by every run).
    """

    name: str
    tasks: tuple[str, ...]
    rows: tuple[str, ...] | None
    seeds: tuple[int, ...]
    epochs: int
    image_size: int
    select: bool
    pack: int = 1
    pack_masks: bool = True
    max_grid: int = 0
    out: str = ""
    guft_path: str = "sparse"

    def replace(self, **changes) -> Preset:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)


GUFT_PATHS = ("sparse", "dense")

# Fashion-MNIST's official 10k test split, subsampled to 2,000 images with a fixed seed.
TASKS = {t.name: t for t in (Task("animal_mnist"), Task("fashion_mnist", 2000), Task("digits"))}

# Rows the README's claim needs; presets that list every row put them first, so they finish
# first on every task and seed.
CLAIM_ROWS = ("pixels", "linear", "guft", "lora", "full")

# The row the table's ``step / full`` column divides each row's step time by.
REFERENCE_ROW = "full"

# The rows that answer "does GUFT at <= LoRA's budget match LoRA?" (issue 12, item 4).
BUDGET_ROWS = (
    "pixels",
    "linear",
    "full",
    "lora",
    "lora_r4",
    "guft",
    "guft_paper",
    "guft_excl",
    "magnitude",
    "fisher",
)

# GUFT's rows: the shipped one, the paper's literal rule and issue 28's one-change ablations.
GUFT_ROWS = (
    "guft",
    "guft_paper",
    "guft_excl",
    "guft_norm",
    "guft_per_row",
    "guft_fisher",
    "guft_5r",
)

# "Which GUFT wins, on CPU" (issue 28): every GUFT ablation beside LoRA r=4 and r=8, full
# fine-tuning and the other gradient-chosen sparse methods (SHiRA with a gradient mask is SNIP-
# like; GPS takes each output row's top inputs once).
EXTENDED_ROWS = (
    "pixels",
    "linear",
    "full",
    "lora",
    "lora_r4",
    "guft",
    "guft_excl",
    "guft_norm",
    "guft_per_row",
    "guft_fisher",
    "guft_5r",
    "shira",
    "gps",
)

# The sentences under every preset's table (a question whose rows did not run is left out).
QUESTIONS = (
    Question(
        "guft",
        ("lora", "full"),
        "GUFT vs LoRA and full fine-tuning (mean test accuracy over seeds):",
    ),
    *(
        Question(
            g,
            ("lora", "lora_r4"),
            "Is {row} >= LoRA at <= LoRA's budget? (mean test accuracy; % of backbone):",
            budget=True,
        )
        for g in GUFT_ROWS
    ),
)


@dataclasses.dataclass(frozen=True)
class Setting:
    """A diagnosis row: a base row (a registered method or variant) with a few hyperparameters
    changed, one question at a time.

    Attributes:
      base: the base row's name.
      kwargs: the hyperparameters changed (over the base row's).
    """

    base: str
    kwargs: dict

    @property
    def name(self) -> str:
        """``base[k=v,...]``, e.g. ``fourierft[init=zeros]``."""
        return f"{self.base}[{','.join(f'{k}={v}' for k, v in self.kwargs.items())}]"


# The diagnosis preset's base rows (issue 30: methods at or below the linear probe) and the probe.
DIAGNOSIS_BASES = ("linear", "fourierft", "diff_pruning", "adalora", "prefix", "vpt_shallow")


def _one_at_a_time(base: str, **axes) -> tuple[Setting, ...]:
    """One :class:`Setting` per value of each axis, the other hyperparameters the base row's."""
    return tuple(Setting(base, {k: v}) for k, vs in axes.items() for v in vs)


# Each axis tests one likely cause, the others left at the registered defaults (in the middle
# of each axis: FourierFT n=1000 α=300 N(0,1); diff pruning re-fits the last 20% of the epochs;
# AdaLoRA's budget schedule as fractions of the run, t_init 0.1, t_final 0.3; 10 prompt tokens).
DIAGNOSIS_SETTINGS = (
    *_one_at_a_time("fourierft", init=("zeros",), alpha=(30.0, 100.0), n=(250, 3000)),
    *_one_at_a_time("diff_pruning", prune_epoch=(2, 6), refit_fraction=(0.5,)),
    *_one_at_a_time("adalora", t_init=(0.0, 0.25), t_final=(0.1, 0.5)),
    *_one_at_a_time("prefix", num_tokens=(2, 50)),
    *_one_at_a_time("vpt_shallow", num_tokens=(2, 50)),
)

# The same questions at the cpu preset's length (5 epochs, 28 px), where diff pruning's prune
# epoch is a fraction: re-fit the last 40% or 80% of the run (default 20%: the last epoch).
DIAGNOSIS_CPU_SETTINGS = (
    *_one_at_a_time("fourierft", init=("zeros",), alpha=(30.0, 100.0), n=(250, 3000)),
    *_one_at_a_time("diff_pruning", refit_fraction=(0.4, 0.8)),
    *_one_at_a_time("adalora", t_init=(0.0, 0.25), t_final=(0.1, 0.5)),
    *_one_at_a_time("prefix", num_tokens=(2, 50)),
    *_one_at_a_time("vpt_shallow", num_tokens=(2, 50)),
)

# The dry run's settings: the same axes at the tiny random ViT's scale (32-wide kernels, 2
# epochs), one value each.
DIAGNOSIS_DRY_SETTINGS = (
    *_one_at_a_time("fourierft", init=("zeros",), alpha=(30.0,), n=(16,)),
    *_one_at_a_time("diff_pruning", prune_epoch=(1,), refit_fraction=(1.0,)),
    *_one_at_a_time("adalora", t_init=(0.0,), t_final=(0.5,)),
    *_one_at_a_time("prefix", num_tokens=(1,)),
    *_one_at_a_time("vpt_shallow", num_tokens=(1,)),
)

# The dry rows' prefix: each base row and setting again, on the tiny random ViT (``DRY_CONFIG``
# over the offline config, then the method's registered ``dry_kwargs``, then the setting's).
DRY_PREFIX = "dry:"
DRY_CONFIG = {"model": "ViT-tiny/4"}


def diagnosis_rows() -> dict[str, tuple[str, dict, bool]]:
    """``{row name: (base row, kwargs over it, dry)}``: the diagnosis presets' rows that are not
    registered methods or variants."""
    out = {s.name: (s.base, s.kwargs, False) for s in DIAGNOSIS_SETTINGS + DIAGNOSIS_CPU_SETTINGS}
    for b in DIAGNOSIS_BASES:
        out[DRY_PREFIX + b] = (b, {}, True)
    for s in DIAGNOSIS_DRY_SETTINGS:
        out[DRY_PREFIX + s.name] = (s.base, s.kwargs, True)
    return out


PRESETS = {
    p.name: p
    for p in (
        # The README's main job (make demo): one task, one seed, registered defaults.
        Preset(
            "demo",
            ("animal_mnist",),
            ("pixels", "linear", "full", "lora", "fourierft", "guft"),
            (0,),
            epochs=4,
            image_size=28,
            select=False,
            out="results/offline_demo",
        ),
        # 3 tasks, every row, 3 seeds, lr selected on val200.
        Preset(
            "full",
            tuple(TASKS),
            None,
            (0, 1, 2),
            epochs=10,
            image_size=56,
            select=True,
            out="results/offline",
        ),
        # The GUFT question on 2 CPU cores: one task, one seed, 28 px, 5 epochs, val200
        # selection over the central 3 factors of each grid (extended once past an edge), the
        # runs of a row packed into one program; mask rows run unpacked on their sparse path (on
        # CPU their dense path's full-size AdamW update costs more than packing saves). Fisher
        # (SPT's score) stands for the one-shot masks.
        Preset(
            "cpu",
            ("animal_mnist",),
            tuple(r for r in BUDGET_ROWS if r != "magnitude"),
            (0,),
            epochs=5,
            image_size=28,
            select=True,
            pack=5,
            pack_masks=False,
            max_grid=3,
        ),
        # Issue 28's "which GUFT wins": the cpu preset's size and selection, GUFT's one-change
        # ablations beside LoRA r=4/r=8, full, SHiRA and GPS, 3 seeds for the final runs.
        Preset(
            "cpu_ext",
            ("animal_mnist",),
            EXTENDED_ROWS,
            (0, 1, 2),
            epochs=5,
            image_size=28,
            select=True,
            pack=5,
            pack_masks=False,
            max_grid=3,
        ),
        # Every row trains through the engine on 2 CPU cores at the demo's size, registered
        # defaults, no lr selection: not a ranking of the methods (one seed, untuned lr).
        Preset("methods", ("animal_mnist",), None, (0,), epochs=4, image_size=28, select=False),
        # Issue 30's diagnosis: each below-the-probe method's likely causes one at a time
        # (DIAGNOSIS_SETTINGS), lr picked on val200 from each row's full grid (extended once past
        # an edge), one seed, at the offline benchmark's size: 152 val200 candidates, up to 44
        # extensions, 44 final runs.
        Preset(
            "diagnosis",
            ("animal_mnist", "digits"),
            DIAGNOSIS_BASES + tuple(s.name for s in DIAGNOSIS_SETTINGS),
            (0,),
            epochs=10,
            image_size=56,
            select=True,
        ),
        # The diagnosis at the cpu preset's size on 2 CPU cores (~1 hour): DINOv2-S/14 at 28 px,
        # 5 epochs, each row's full lr grid packed into one program.
        Preset(
            "diagnosis_cpu",
            ("animal_mnist", "digits"),
            DIAGNOSIS_BASES + tuple(s.name for s in DIAGNOSIS_CPU_SETTINGS),
            (0,),
            epochs=5,
            image_size=28,
            select=True,
            pack=5,
        ),
        # The same pipeline in minutes on 2 CPU cores: the tiny random ViT at 16 px on digits,
        # 2 epochs, the central 2 factors of each lr grid.
        Preset(
            "diagnosis_dry",
            ("digits",),
            tuple(DRY_PREFIX + b for b in DIAGNOSIS_BASES)
            + tuple(DRY_PREFIX + s.name for s in DIAGNOSIS_DRY_SETTINGS),
            (0,),
            epochs=2,
            image_size=16,
            select=True,
            max_grid=2,
            out="/tmp/guft_jax_diagnosis_dry",
        ),
        # The GUFT question at accelerator scale (one H200, ~10 minutes with --workers 4).
        Preset(
            "gpu",
            tuple(TASKS),
            BUDGET_ROWS,
            (0, 1, 2),
            epochs=20,
            image_size=112,
            select=True,
            pack=5,
        ),
    )
}


def out_dir(preset: Preset) -> str:
    """The preset's default output folder (``results/offline_<name>`` unless it names one)."""
    return preset.out or f"results/offline_{preset.name}"


@dataclasses.dataclass(frozen=True)
class SizesPreset:
    """Shipped defaults vs ``lr="auto"`` over dataset sizes (users' data, ``npz:``).

    Each ``(dataset, size)`` is a stratified subsample of the dataset's pool written as a user's
    ``npz:`` file, so it is split as users' data is (:mod:`guft_jax.data.splits`: 70/10/20 below
    1,250 images, 800/200/rest from there); every method trains with its registered defaults
    (``experiments/configs/offline.py``) once at its shipped lr and once at ``lr="auto"``.

    Attributes:
      name: the preset's name.
      datasets: packaged datasets subsampled (their training pools).
      sizes: images per subsample (capped at the pool: Animal-MNIST has 9,716 unique images).
      methods: the methods; ``reference`` is the linear probe the others must reach.
      lr_modes: ``"default"`` (the registered lr) and/or ``"auto"``.
      seeds: the subsample's and the run's seeds.
      epochs: training epochs.
      image_size: input size in pixels.
      model: the backbone (``experiments.run``'s ``model``: a pretrained name or a ViT config).
      out: the default output folder.
    """

    name: str
    datasets: tuple[str, ...] = ("animal_mnist", "fashion_mnist")
    sizes: tuple[int, ...] = (30, 100, 300, 1000, 10000)
    methods: tuple[str, ...] = ("linear", "full", "lora", "guft", "aflora")
    reference: str = "linear"
    lr_modes: tuple[str, ...] = ("default", "auto")
    seeds: tuple[int, ...] = (0,)
    epochs: int = 10
    image_size: int = 56
    model: str = "dinov2_s14"
    out: str = ""

    def replace(self, **changes) -> SizesPreset:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)


LR_MODES = ("default", "auto")

SIZE_PRESETS = {
    p.name: p
    for p in (
        # issue 31's acceptance table: 2 datasets x 5 sizes x 5 methods x 2 lr modes (linear is
        # the reference), DINOv2-S/14 at 56 px, 10 epochs.
        SizesPreset("sizes", out="results/sizes"),
        # the same table at the cpu preset's image size (28 px: 4 patch tokens), sized for 2 CPU
        # cores (~2 h): the acceptance table when no accelerator is lent.
        SizesPreset("sizes_cpu", image_size=28, out="results/sizes_cpu"),
        # the same pipeline in seconds (CI / a first check): the tiny random ViT at 16 px.
        SizesPreset(
            "sizes_dry",
            datasets=("animal_mnist",),
            sizes=(30, 100),
            epochs=3,
            image_size=16,
            model="ViT-tiny/4",
            out="/tmp/guft_jax_sizes_dry",
        ),
    )
}

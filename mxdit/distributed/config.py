""":class:`ParallelConfig`: the device layout of one generation, with SGLang's degree rules."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

#: why ``--tp-size > 1`` is refused (one line; see ../shared/reference/scale-out-and-serving.md §5)
TP_NOT_SUPPORTED = (
    "--tp-size > 1 is not supported yet: row-parallel TP splits K, and dual-level MXFP4 needs every K shard "
    "to be a multiple of 512 (Wan2.2-A14B's ffn down projection has K = 13824 = 27 x 512, so no TP > 1 fits); "
    "use --ulysses-degree / --enable-cfg-parallel instead"
)
RING_NOT_SUPPORTED = (
    "--ring-degree > 1 is not supported yet: ring attention needs an attention kernel that returns the "
    "log-sum-exp for every backend (the MX attention backends do not); use --ulysses-degree (Ulysses alone "
    "covers 8 devices with A14B's 40 heads)"
)


class ParallelConfigError(ValueError):
    """A rejected device layout; the message is one line and names the flag."""


@dataclass(frozen=True)
class ParallelConfig:
    """How one generation is split over ``num_gpus`` ranks.

    ``num_gpus = cfg_degree x tp_size x ulysses_degree x ring_degree`` (SGLang's
    ``num_gpus = dp x cfg x tp x sp`` with dp = 1); ``sp_degree = ulysses x ring``.
    Rank order is SGLang's "tp-sp-pp-cfg-dp" (sp varies fastest):
    ``rank = cfg_rank * sp_degree + sp_rank``.
    """

    num_gpus: int = 1
    ulysses_degree: int = 1
    ring_degree: int = 1
    cfg_degree: int = 1
    tp_size: int = 1

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def world_size(self) -> int:
        return self.num_gpus

    @property
    def enable_cfg_parallel(self) -> bool:
        return self.cfg_degree > 1

    @classmethod
    def resolve(
        cls,
        num_gpus: Optional[int] = None,
        ulysses_degree: Optional[int] = None,
        ring_degree: Optional[int] = None,
        enable_cfg_parallel: bool = False,
        tp_size: int = 1,
        uses_cfg: bool = True,
    ) -> "ParallelConfig":
        """Fill the unset degrees as SGLang's ``ServerArgs._adjust_parallelism`` does.

        * ``num_gpus`` defaults to the product of the given degrees (1 when none is given);
        * CFG parallel (degree 2) is on when ``enable_cfg_parallel``, or by itself when no
          SP degree is given, there are >= 2 GPUs and the model uses CFG;
        * the SP degree defaults to the GPUs left over (``num_gpus / (cfg x tp)``), as
          Ulysses, with ``ring_degree`` 1;
        * a given ``ulysses_degree`` with no ``ring_degree`` takes the rest as ring, and
          the reverse.

        The result is checked with :meth:`check_product` (a one-line :class:`ParallelConfigError`).
        """
        for flag, v in (("--num-gpus", num_gpus), ("--ulysses-degree", ulysses_degree),
                        ("--ring-degree", ring_degree), ("--tp-size", tp_size)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ParallelConfigError(f"{flag} must be an integer >= 1, got {v!r}")
        tp = int(tp_size or 1)
        sp_given = ulysses_degree is not None or ring_degree is not None
        if num_gpus is None:
            cfg = 2 if enable_cfg_parallel else 1
            num_gpus = cfg * tp * (ulysses_degree or 1) * (ring_degree or 1)
        if enable_cfg_parallel:
            cfg = 2
        elif not sp_given and num_gpus >= 2 and uses_cfg and num_gpus % (2 * tp) == 0:
            cfg = 2  # SGLang: CFG parallel by default when no SP degree is asked for
        else:
            cfg = 1
        if num_gpus % (cfg * tp):
            raise ParallelConfigError(
                f"--num-gpus {num_gpus} is not divisible by cfg degree {cfg} x --tp-size {tp}"
            )
        sp = num_gpus // (cfg * tp)
        if ulysses_degree is None and ring_degree is None:
            ulysses, ring = sp, 1
        elif ulysses_degree is None:
            ring = ring_degree
            if sp % ring:
                raise ParallelConfigError(f"--ring-degree {ring} does not divide the sp degree {sp} "
                                          f"(--num-gpus {num_gpus} / cfg {cfg} / tp {tp})")
            ulysses = sp // ring
        elif ring_degree is None:
            ulysses = ulysses_degree
            if sp % ulysses:
                raise ParallelConfigError(f"--ulysses-degree {ulysses} does not divide the sp degree {sp} "
                                          f"(--num-gpus {num_gpus} / cfg {cfg} / tp {tp})")
            ring = sp // ulysses
        else:
            ulysses, ring = ulysses_degree, ring_degree
        pc = cls(num_gpus=num_gpus, ulysses_degree=ulysses, ring_degree=ring, cfg_degree=cfg, tp_size=tp)
        pc.check_product()
        return pc

    def check_product(self) -> None:
        product = self.cfg_degree * self.tp_size * self.ulysses_degree * self.ring_degree
        if product != self.num_gpus:
            raise ParallelConfigError(
                f"--num-gpus {self.num_gpus} must equal cfg {self.cfg_degree} x --tp-size {self.tp_size} x "
                f"--ulysses-degree {self.ulysses_degree} x --ring-degree {self.ring_degree} = {product}"
            )
        if self.cfg_degree not in (1, 2):
            raise ParallelConfigError(f"cfg degree must be 1 or 2, got {self.cfg_degree}")

    def validate(self, *, num_heads: Optional[int] = None, seq_len: Optional[int] = None,
                 uses_cfg: Optional[bool] = None) -> None:
        """Reject what this build cannot run, before anything loads (one-line :class:`ParallelConfigError`).

        ``num_heads``: the transformer's attention heads (must divide by ``ulysses_degree``);
        ``seq_len``: the video's token count after patch embedding (must divide by
        ``sp_degree``: tokens are not padded, since unmasked padding changes the result);
        ``uses_cfg``: False when guidance is off (then CFG parallel has nothing to split).
        """
        self.check_product()
        if self.tp_size > 1:
            raise ParallelConfigError(TP_NOT_SUPPORTED)
        if self.ring_degree > 1:
            raise ParallelConfigError(RING_NOT_SUPPORTED)
        if num_heads is not None and num_heads % self.ulysses_degree:
            raise ParallelConfigError(
                f"--ulysses-degree {self.ulysses_degree} must divide the model's {num_heads} attention heads"
            )
        if seq_len is not None and seq_len % self.sp_degree:
            raise ParallelConfigError(
                f"the video has {seq_len} tokens, not divisible by the sequence-parallel degree {self.sp_degree} "
                f"(--ulysses-degree x --ring-degree); choose --height/--width/--num-frames so it divides"
            )
        if uses_cfg is False and self.cfg_degree > 1:
            raise ParallelConfigError(
                "--enable-cfg-parallel needs classifier-free guidance (guidance scale > 1); it is off here"
            )

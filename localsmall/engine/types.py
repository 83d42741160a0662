"""What goes into and comes out of the engine. Pure data: importing this module does not
load llama.cpp, so the CLI, the chat session and the tests can use these types freely."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from localsmall.images import PreparedImage



@dataclass(frozen=True)
class KvCacheType:
    """A type the KV cache can be stored in: llama.cpp's ggml type id, and its storage
    (elements per block, bytes per block)."""

    ggml_type: int
    block: int
    block_bytes: int

    @property
    def quantized(self) -> bool:
        return self.block > 1


# The one list of KV cache types (the first is the default); the planner sizes them,
# the engine hands their ggml ids to llama.cpp, the CLI offers their names.
KV_CACHE_TYPES = {
    "f16": KvCacheType(ggml_type=1, block=1, block_bytes=2),
    "q8_0": KvCacheType(ggml_type=8, block=32, block_bytes=34),
    "q4_0": KvCacheType(ggml_type=2, block=32, block_bytes=18),
    "f32": KvCacheType(ggml_type=0, block=1, block_bytes=4),
    "bf16": KvCacheType(ggml_type=30, block=1, block_bytes=2),
}
KV_TYPES = tuple(KV_CACHE_TYPES)


@dataclass(frozen=True)
class EngineSettings:
    """How to load a model. `n_gpu_layers=-1` offloads every layer."""

    model_path: Path
    mmproj_path: Path | None = None
    n_ctx: int = 8192
    n_batch: int = 512
    n_threads: int | None = None
    n_gpu_layers: int = 0
    kv_type: str = "f16"
    flash_attn: bool | None = None  # None: let llama.cpp decide
    verbose: bool = False
    n_seq: int = 1  # sequences (conversations) the context keeps at once, sharing its cells
    # RPC workers (HOST:PORT) whose devices take the last n_gpu_layers layers (output head
    # included), shared in proportion to tensor_split (one share per remote device; empty:
    # llama.cpp's default, by free memory). Local GPUs are not used alongside workers.
    rpc_servers: tuple[str, ...] = ()
    tensor_split: tuple[float, ...] = ()


@dataclass(frozen=True)
class Constraint:
    """What the reply must look like: a llama.cpp grammar (GBNF, start rule `root`) in
    which control tokens are written `<[TOOL_CALLS]>` (the engine puts in their ids).
    A `lazy` grammar waits for one of the `triggers` (control tokens) and constrains what
    follows from it on; text before it is free. `allowed_control`, when set, forbids every
    other control token but end-of-sequence (so none can slip into a JSON string)."""

    grammar: str = ""
    lazy: bool = False
    triggers: tuple[str, ...] = ()
    allowed_control: tuple[str, ...] | None = None


@dataclass(frozen=True)
class SamplingSettings:
    """Token sampling. temperature 0 means greedy (deterministic)."""

    temperature: float = 0.15
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0    # OpenAI's: subtract once per token already generated
    frequency_penalty: float = 0.0   # OpenAI's: subtract per occurrence
    seed: int | None = None
    max_tokens: int | None = None
    constraint: Constraint | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)


@dataclass(frozen=True)
class TokenRun:
    """A run of text tokens in a prompt."""

    ids: tuple[int, ...]


@dataclass(frozen=True)
class ImageSlot:
    """An image in a prompt. The engine encodes it with the projector; `grid` is its size
    in merged patches (columns, rows), known once the image is prepared."""

    image: PreparedImage


PromptPiece = TokenRun | ImageSlot


@dataclass(frozen=True)
class Progress:
    """Progress of long work inside a turn, for progress bars."""

    stage: Literal["load", "image", "prompt"]
    done: float      # may be fractional: a share of a batch (a batch can take a minute)
    total: int
    label: str = ""


ProgressCallback = Callable[[Progress], None]


StopReason = Literal["eos", "length", "context", "interrupted", ""]


@dataclass(frozen=True)
class TurnStats:
    """What one generation cost."""

    prompt_tokens: int = 0          # positions the whole prompt occupies
    reused_tokens: int = 0          # of those, already in the KV cache
    evaluated_tokens: int = 0       # of those, evaluated this turn
    images_encoded: int = 0         # images run through the vision encoder this turn
    image_tokens_encoded: int = 0   # their prompt positions (patches and row breaks)
    generated_tokens: int = 0
    read_batches: int = 0           # llama_decode calls that read the prompt
    image_encode_s: float = 0.0
    prompt_eval_s: float = 0.0      # evaluation of the prompt, images included
    time_to_first_token_s: float = 0.0
    waited_s: float = 0.0           # of that, waiting for a read started before the turn
    generation_s: float = 0.0
    stop_reason: StopReason = ""
    context_used: int = 0           # positions in the KV cache after the turn
    context_size: int = 0

    @property
    def prompt_tps(self) -> float:
        return self.evaluated_tokens / self.prompt_eval_s if self.prompt_eval_s > 0 else 0.0

    @property
    def read_s(self) -> float:
        """Seconds spent reading the prompt into the context (image encoding excluded)."""
        return max(self.prompt_eval_s - self.image_encode_s, 0.0)

    @property
    def read_tps(self) -> float:
        """Prompt reading speed, tokens/s (image positions count, encoding does not)."""
        return self.evaluated_tokens / self.read_s if self.read_s > 0 else 0.0

    @property
    def image_encode_tps(self) -> float:
        """Image tokens the vision encoder produced per second."""
        return (self.image_tokens_encoded / self.image_encode_s if self.image_encode_s > 0
                else 0.0)

    @property
    def generation_tps(self) -> float:
        # The first token comes from the prompt's logits: rate the ones that needed a decode.
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.generation_s if self.generation_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready counters, with the two rates."""
        return asdict(self) | {"prompt_tps": self.prompt_tps, "read_s": self.read_s,
                               "read_tps": self.read_tps,
                               "generation_tps": self.generation_tps}


@dataclass(frozen=True)
class TokenEvent:
    """One generated token: its id and the text it completes (may be empty while a
    multi-byte character is still incomplete). `piece` is the same text with control
    tokens spelled out ("[TOOL_CALLS]"): what the tool-call parser reads."""

    id: int
    text: str
    piece: str = ""


@dataclass
class TurnResult:
    """Filled in as a turn streams; complete once the stream ends."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    stats: TurnStats = field(default_factory=TurnStats)


@dataclass(frozen=True)
class ModelInfo:
    """Facts about a loaded model."""

    path: Path
    description: str
    size_bytes: int
    n_params: int
    n_ctx_train: int
    n_ctx: int
    n_vocab: int
    n_layers: int
    n_embd: int
    chat_template: str | None
    has_vision: bool
    gpu_offload: bool
    n_gpu_layers: int
    weight_buffers: str
    metadata: dict[str, str] = field(default_factory=dict)

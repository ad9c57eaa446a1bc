"""The router classifier at serving time: one ONNX forward pass gives the prompt's
normalized embedding (for the semantic cache) and ``p_large`` (for ``auto`` routing).

* onnxruntime with the CUDA execution provider when a GPU is usable (and the artifact
  ships a GPU variant, else the CPU one runs there), the CPU provider otherwise; the
  active provider is in ``Classifier.provider``.
* ``score()`` never blocks the event loop: requests go to a queue, a batcher task
  collects them (up to ``max_batch``), and tokenization + inference of the batch run in a
  dedicated single-thread executor. While one batch runs the next one fills up, so
  throughput grows with load.
* The queue is fair across tenants (:class:`_FairQueue`): one FIFO per tenant, a batch takes
  one prompt of each waiting tenant in turn. On the CPU (a pass per prompt, the batch's
  answers all at its end) a batch is one prompt while several tenants wait, and a batch stops
  after its current prompt when a tenant with none in it is waiting. A tenant's burst of long
  prompts queued in front of everyone added ~180 ms to each of another tenant's requests
  (t51); now another tenant's prompt waits for about one pass per waiting tenant. One tenant
  alone is batched as before.
* On the CPU provider each prompt of a batch still gets its own forward pass: the int8
  graph quantizes activations with one scale per batch tensor, so in a shared pass a
  prompt's score would move with whatever other prompts (other tenants') rode along
  (routing head p95 shift 0.065, up to 0.17). Alone, a prompt scores the same every time,
  and no padding is computed; on 2 cores this costs ~18 % of peak throughput on
  window-filling prompts and nothing measurable on real mixed-length ones. Under CUDA
  the batch runs as one pass. The batcher waits up to ``max_wait_s`` for peers only when
  the previous batch had company: a lone request on an idle gateway does not pay the wait.
* ``load_classifier`` returns ``None`` (and logs why) when the artifacts are missing,
  do not match their recorded sha256, or fail to load; it never raises.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import structlog

from gateway.classifier.features import surface_features
from gateway.classifier.head import HeadError, RoutingHead, load_head
from gateway.inference import ArtifactError, load_onnx_model, sha256_file

_log = structlog.get_logger("gateway.classifier")

DEFAULT_MAX_BATCH = 32
DEFAULT_MAX_WAIT_S = 0.001
_FEATURE_CHARS = 16_000  # the head's surface features read at most this much of a prompt


class ClassifierError(RuntimeError):
    """Inference failed; the caller falls back to the route's default model."""


@dataclass(frozen=True, slots=True)
class RouterScore:
    p_large: float
    embedding: np.ndarray  # float32, L2-normalized, shape (d,)
    truncated: bool = False
    """The text filled the model's token window: the score and embedding may not have seen all of it."""
    features: np.ndarray | None = None
    """The text's surface features (gateway/classifier/features.py), where the routing head read them."""


class _Job(NamedTuple):
    tenant: str
    text: str
    future: asyncio.Future[RouterScore]


class _FairQueue:
    """Prompts waiting for the classifier: one FIFO per tenant, taken one tenant at a time in
    turn, so that one tenant's burst does not queue in front of every other tenant's prompts (t51).
    A prompt of a tenant with none in the run at work asks that run to stop early (:meth:`put`)."""

    __slots__ = ("_cut", "_lanes", "_ready", "_running", "_size")

    def __init__(self) -> None:
        self._lanes: dict[str, deque[_Job]] = {}
        """Per tenant, in turn order: the next take starts with the first."""
        self._size = 0
        self._ready = asyncio.Event()
        self._running: frozenset[str] = frozenset()
        """The tenants with a prompt in the run at work."""
        self._cut = threading.Event()

    def __len__(self) -> int:
        return self._size

    def put(self, job: _Job) -> None:
        lane = self._lanes.get(job.tenant)
        if lane is None:
            lane = self._lanes[job.tenant] = deque()
            if self._running and job.tenant not in self._running:
                self._cut.set()  # a tenant the run at work keeps waiting: it stops after its current prompt
        lane.append(job)
        self._size += 1
        self._ready.set()

    async def wait(self) -> None:
        """Until a prompt is queued."""
        while not self._size:
            self._ready.clear()
            await self._ready.wait()

    def take(self, n: int, singly: bool = False) -> list[_Job]:
        """Up to ``n`` prompts, one of each tenant in turn; a tenant served goes to the back of the
        turn. ``singly``: when several tenants wait, the next prompt only (a run's answers come all
        at its end: on the CPU each prompt of a run makes all of them wait a pass)."""
        lanes, out = self._lanes, []
        if len(lanes) == 1:  # one tenant waiting (the common case): its FIFO, no turns to keep
            tenant, lane = next(iter(lanes.items()))
            out = [lane.popleft() for _ in range(min(n, len(lane)))]
            if not lane:
                del lanes[tenant]
        else:
            n = 1 if singly else n
            while lanes and len(out) < n:
                tenant = next(iter(lanes))
                lane = lanes.pop(tenant)
                out.append(lane.popleft())
                if lane:
                    lanes[tenant] = lane
        self._size -= len(out)
        return out

    def take_all(self) -> list[_Job]:
        return self.take(self._size)

    def run(self, jobs: list[_Job]) -> threading.Event:
        """``jobs`` are at work: the event that says another tenant waits (cleared now)."""
        self._running = frozenset(job.tenant for job in jobs)
        self._cut.clear()
        if any(tenant not in self._running for tenant in self._lanes):
            self._cut.set()
        return self._cut

    def ran(self, unscored: list[_Job]) -> None:
        """The run at work is over; ``unscored``, the prompts it stopped before, go back to the front
        of their lanes, and their tenants to the back of the turn (the one waiting goes first)."""
        self._running = frozenset()
        for job in reversed(unscored):
            lane = self._lanes.pop(job.tenant, None) or deque()
            lane.appendleft(job)
            self._lanes[job.tenant] = lane
        self._size += len(unscored)


class _Encoded:
    """Token ids put together from two encodings (what :meth:`Classifier._run` reads of one)."""

    __slots__ = ("ids",)

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids


def _tail_tokenizer(tokenizer: Any, tokens: int) -> Any:
    """A copy of ``tokenizer`` that keeps a text's last ``tokens`` tokens, without special tokens."""
    to_str, from_str = getattr(tokenizer, "to_str", None), getattr(type(tokenizer), "from_str", None)
    if to_str is None or from_str is None:
        return None
    tail = from_str(to_str())
    tail.enable_truncation(max_length=tokens, direction="left")
    tail.no_padding()
    return tail


class Classifier:
    """Loaded router. Build it with :func:`load_classifier`."""

    def __init__(
        self,
        *,
        session: Any,
        tokenizer: Any,
        config: dict[str, Any],
        model_file: str,
        version: str,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        head: RoutingHead | None = None,
        head_version: str | None = None,
        row_by_row: bool = False,
    ) -> None:
        self._session = session
        self._head = head
        self.head_version = head_version
        self.row_by_row = row_by_row
        self._tokenizer = tokenizer
        self.config = config
        self.model_file = model_file
        self.version = version
        self.provider: str = session.get_providers()[0]
        self.max_tokens: int = int(config["max_tokens"])
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max(0.0, float(max_wait_s))
        # characters cut before tokenizing (cheap bound on tokenizer work for huge prompts)
        self._max_chars = self.max_tokens * 12
        self._truncate_left = config.get("truncation", "right") == "left"
        content = self.max_tokens - 2  # [CLS] ... [SEP]
        self._head_tokens = content // 2
        self._tail_tokenizer = _tail_tokenizer(tokenizer, content - self._head_tokens)
        self.read_ends = True
        """Read a text longer than the window at both ends (:meth:`_read_ends`); off: its start only."""
        self.with_features = head is not None
        """Give each score the surface features of the text read (fitting a head needs them as served)."""
        self._input_names = {i.name for i in session.get_inputs()}
        self._out_names = [o.name for o in session.get_outputs()]
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-onnx")
        self._lock = threading.Lock()
        self._queue: _FairQueue | None = None
        self._batcher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.batches_run = 0  # batches through score() (observability / tests)
        self.max_batch_seen = 0
        self._last_batch_size = 0

    # ---------------------------------------------------------------- sync path
    def _clip(self, text: str) -> str:
        if len(text) <= self._max_chars:
            return text
        return text[-self._max_chars :] if self._truncate_left else text[: self._max_chars]

    def _infer(self, texts: list[str], stop: threading.Event | None = None) -> list[RouterScore]:
        """Scores of ``texts``, in order; row by row, once ``stop`` is set, only of those run until
        then (at least one): another tenant's prompt is waiting (t51)."""
        with self._lock:
            encs = self._tokenizer.encode_batch([self._clip(t) for t in texts])
            long = self.max_tokens if self.read_ends else None
            read = [self._read_ends(t, e) if len(e.ids) == long else (e, t) for t, e in zip(texts, encs, strict=True)]
        encs, texts = [e for e, _ in read], [t for _, t in read]
        if self.row_by_row:
            runs = []
            for e in encs:
                runs.append(self._run([e]))
                if stop is not None and stop.is_set():
                    break
            encs, texts = encs[: len(runs)], texts[: len(runs)]
            emb = np.concatenate([r[0] for r in runs])
            p = np.concatenate([r[1] for r in runs])
        else:
            emb, p = self._run(encs)
        emb = np.asarray(emb, dtype=np.float32)
        p = np.clip(np.asarray(p, dtype=np.float32).reshape(-1), 0.0, 1.0)
        feats: np.ndarray | None = None
        if self.with_features:
            feats = np.stack([surface_features(t[:_FEATURE_CHARS]) for t in texts])
        full, cut = self.max_tokens, self._max_chars
        filled = np.array([len(e.ids) >= full or len(t) > cut for e, t in zip(encs, texts, strict=True)])
        if self._head is not None and feats is not None:
            p = self._head.p_large(emb, p, feats, long=filled)
        return [
            RouterScore(float(p[i]), emb[i], bool(filled[i]), None if feats is None else feats[i])
            for i in range(len(encs))
        ]

    def _read_ends(self, text: str, encoding: Any) -> tuple[Any, str]:
        """A text longer than the window, read at both ends: its first and last half-windows of
        tokens (a pasted document's request is usually after it, an instruction before it), and
        the surface features of that text only. The window's start alone scored long prompts
        at chance (router_models/README.md, "Long prompts")."""
        if self._truncate_left or self._tail_tokenizer is None:
            return encoding, text
        head = self._head_tokens
        tail_chars = text[-(self.max_tokens - 2 - head) * 12 :]
        tail = self._tail_tokenizer.encode(tail_chars, add_special_tokens=False)
        if not tail.ids:
            return encoding, text
        ids = [*encoding.ids[: 1 + head], *tail.ids, encoding.ids[-1]]
        read = text[: encoding.offsets[head][1]] + "\n" + tail_chars[tail.offsets[0][0] :]
        return _Encoded(ids), read

    def _run(self, encs: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        """One forward pass over tokenized texts, padded to the longest."""
        n = len(encs)
        width = max(1, max(len(e.ids) for e in encs))
        ids = np.zeros((n, width), dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for i, e in enumerate(encs):
            k = len(e.ids)
            ids[i, :k] = e.ids
            mask[i, :k] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        feeds = {k: v for k, v in feeds.items() if k in self._input_names}
        emb, p = self._session.run(self._out_names, feeds)
        return np.asarray(emb, dtype=np.float32).reshape(n, -1), np.asarray(p, dtype=np.float32).reshape(-1)

    def score_batch_sync(self, texts: list[str]) -> list[RouterScore]:
        """Score raw texts (already selected) in one forward pass, on the calling thread."""
        if not texts:
            return []
        out: list[RouterScore] = []
        for start in range(0, len(texts), max(self.max_batch, 1)):
            out.extend(self._infer(list(texts[start : start + self.max_batch])))
        return out

    # --------------------------------------------------------------- async path
    def _ensure_batcher(self) -> _FairQueue:
        loop = asyncio.get_running_loop()
        if self._queue is None or self._loop is not loop or self._batcher is None or self._batcher.done():
            self._loop = loop
            self._queue = _FairQueue()
            self._batcher = loop.create_task(self._batch_loop(self._queue), name="router-batcher")
        return self._queue

    async def score(self, text: str, tenant: str = "") -> RouterScore:
        """``p_large`` and the embedding for the text the router reads of a request
        (:mod:`gateway.classifier.text`), micro-batched, off the loop, in turn with other
        tenants' prompts."""
        if self._closed:
            raise ClassifierError("classifier is closed")
        queue = self._ensure_batcher()
        fut: asyncio.Future[RouterScore] = asyncio.get_running_loop().create_future()
        queue.put(_Job(tenant, text, fut))
        return await fut

    async def _batch_loop(self, queue: _FairQueue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await queue.wait()
            if len(queue) == 1 and self.max_wait_s > 0 and self._last_batch_size > 1:
                await asyncio.sleep(self.max_wait_s)  # under load: a bounded wait for peers to join
            live = [job for job in queue.take(self.max_batch, singly=self.row_by_row) if not job.future.done()]
            if not live:
                continue
            self.batches_run += 1
            self._last_batch_size = len(live)
            self.max_batch_seen = max(self.max_batch_seen, len(live))
            try:
                scores = await loop.run_in_executor(
                    self._executor, self._infer, [job.text for job in live], queue.run(live)
                )
            except Exception as exc:
                queue.ran([])
                _log.warning("classifier_inference_failed", error=repr(exc), batch=len(live))
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(ClassifierError(repr(exc)))
                continue
            queue.ran(live[len(scores) :])
            for job, score in zip(live, scores, strict=False):
                if not job.future.done():
                    job.future.set_result(score)

    async def aclose(self) -> None:
        self._closed = True
        if self._batcher is not None and not self._batcher.done():
            self._batcher.cancel()
            try:
                await self._batcher
            except (asyncio.CancelledError, Exception):
                pass
        if self._queue is not None:
            for job in self._queue.take_all():
                if not job.future.done():
                    job.future.set_exception(ClassifierError("classifier closed"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def signature(self) -> str:
        """Which scores and vectors this classifier gives: its graph and routing head. What was
        learnt from one (a deployment's router, its labels) means nothing to another."""
        return f"{self.version}/{self.head_version or 'graph'}"

    @property
    def embedding_dim(self) -> int:
        return int(self.config.get("embedding_dim", 384))

    def describe(self) -> dict[str, Any]:
        """For /readyz and the start-up log."""
        return {
            "provider": self.provider,
            "version": self.version,
            "model_file": self.model_file,
            "routing_head": self.head_version,
            "max_tokens": self.max_tokens,
            "max_batch": self.max_batch,
            "max_wait_ms": self.max_wait_s * 1000,
            "row_by_row": self.row_by_row,
        }


def load_classifier(
    artifacts_dir: str | Path,
    *,
    prefer_gpu: bool = True,
    variant: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_wait_s: float = DEFAULT_MAX_WAIT_S,
    intra_op_threads: int | None = None,
    use_head: bool = True,
    row_by_row: bool | None = None,
) -> Classifier | None:
    """Load the router from ``artifacts_dir`` (config.json, tokenizer, ONNX graph).

    ``variant`` picks a model file key from config["files"] (e.g. "int8", "fp32");
    by default the GPU variant under CUDA and the CPU variant otherwise. ``use_head=False``
    serves the graph's own ``p_large`` (for fitting a new head on the graph's outputs).
    ``row_by_row`` (default: on the CPU provider) runs each prompt of a batch alone.
    Returns None, with a ``classifier_unavailable`` log line saying why, on any failure.
    """
    try:
        model = load_onnx_model(
            artifacts_dir, prefer_gpu=prefer_gpu, variant=variant, intra_op_threads=intra_op_threads
        )
    except ArtifactError as exc:
        _log.warning("classifier_unavailable", reason=exc.reason, **exc.details)
        return None
    try:
        config = model.config
        model.tokenizer.enable_truncation(
            max_length=int(config["max_tokens"]),
            direction="left" if config.get("truncation") == "left" else "right",
        )
        model.tokenizer.no_padding()
        outs = [o.name for o in model.session.get_outputs()]
        if outs[:2] != ["embedding", "p_large"]:
            _log.warning("classifier_unavailable", reason="unexpected_outputs", outputs=outs)
            return None
        head, head_version = _load_head(Path(artifacts_dir), config) if use_head else (None, None)
        clf = Classifier(
            session=model.session,
            tokenizer=model.tokenizer,
            config=config,
            model_file=model.model_file,
            version=model.version,
            max_batch=max_batch,
            max_wait_s=max_wait_s,
            head=head,
            head_version=head_version,
            row_by_row=model.provider != "CUDAExecutionProvider" if row_by_row is None else row_by_row,
        )
        clf.score_batch_sync(["warm up"])  # fail here, not on the first request
    except HeadError as exc:
        _log.warning("classifier_unavailable", reason="bad_routing_head", error=str(exc)[:300])
        return None
    except Exception as exc:
        _log.warning("classifier_unavailable", reason="load_failed", path=str(artifacts_dir), error=repr(exc))
        return None
    if model.why_not_cuda is None and clf.provider != "CUDAExecutionProvider":
        _log.warning("classifier_gpu_unavailable", reason="CUDA provider listed but failed to start; using CPU")
    _log.info("classifier_loaded", **clf.describe(), threads=model.threads, why_not_cuda=model.why_not_cuda)
    return clf


def _load_head(directory: Path, config: dict[str, Any]) -> tuple[RoutingHead | None, str | None]:
    """The routing head named in ``config["files"]["head"]`` (checked like the graph), if any."""
    name = config.get("files", {}).get("head")
    if name is None:
        return None, None
    path = directory / name
    if not path.is_file():
        raise HeadError(f"routing head {path} is missing")
    digest = sha256_file(path)
    want = config.get("sha256", {}).get(name)
    if want is not None and digest != want:
        raise HeadError(f"routing head {path} does not match its recorded sha256")
    return load_head(path, int(config.get("embedding_dim", 384))), digest[:16]

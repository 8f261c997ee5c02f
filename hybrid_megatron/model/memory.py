"""Per-GPU memory estimate of a run, for the worst pipeline stage (what `pretrain --dry-run` prints).

Bytes held by one GPU = weights + gradients + optimizer state + activations + overhead, per pipeline
stage; the estimate reports every stage and judges the largest. GB = 1e9 bytes. Legend: T tokens per
micro-batch on one GPU (micro_batch_size x seq_len / CP, packed or not: context parallelism splits each
sequence over CP ranks, and its ring of K/V chunks adds 8T kv hd / t to attention's working set), H hidden,
t TP size, s = t with sequence parallel else 1, V padded vocab, P a stage's parameters per TP rank
(TP-sharded params / t + params megatron replicates over TP: pre-norm weights, row-parallel biases, the final
norm), DP = GPUs / (t x PP x CP).

States (megatron DDP with grad_reduce_in_fp32, as training/loop.py builds it):
  weights    2 B/param (bf16), 4 B for the fp32 SSM params (A_log, D, dt_bias) and for dtype fp32
  fp8        + 2 B per GEMM weight of the FP8 layers (outside the BF16 first/last layers): TE keeps the
             bf16 weight as the master and caches a row-wise FP8 copy plus the column-wise (transposed)
             one that Hopper's FP8 GEMMs need in the backward, for all micro-batches of the step
  grads      4 B/param: the fp32 grad buffer is full size on every rank, distributed optimizer or not
  optimizer  Adam: fp32 master + m + v = 12 B per bf16 param, 8 B per fp32 param (it is its own
             master); divided by DP x CP with the distributed optimizer (megatron shards it over the
             data-and-context-parallel group), whole without it

Activations kept for the backward, per layer and micro-batch (Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models", adapted to this stack; dropout is 0 in our
models, so no masks; every tensor bf16 unless marked, FP8 layers assumed to keep bf16 copies too):
  pre-norm (fused into the first GEMM)  4TH/s + 4T/s       (input = residual, normed GEMM input, fp32 rstd)
  mamba      + [2T(2di + 2GN + nh) + 3 * 2T di + 4TG] / t  (in_proj output [z,x,B,C,dt] and the SSD
             output before gating, both saved by mamba_split_conv1d_scan_combined; gated-norm input;
             out_proj input; fp32 group-norm rstd). The memory-efficient kernel recomputes the conv
             output and the chunk states in the backward, so those are working set, below.
  mamba, CP by state passing (model/mamba_cp_mixer.py: conv and scan unfused) instead
             + [2T W + 4T c + 6T di + 4TG + 24T nh] / t + 9T   (c = di + 2GN conv channels: in_proj output,
             kept by the gate's z; conv input with its halo and conv output, which the scan keeps; scan
             output, gated-norm input, out_proj input; fp32 dt before and after softplus, the scan's dA
             cumsum, the decay's cumsum, exp and reach; int32 document ids of the conv and the scan, 4T
             each, and the bool carried mask, T)
             + 4 b [n (di N + nh) + 2 di N] / t   (b sequences of the micro-batch, n = 2 CP chunks of each:
             every chunk's fp32 final state and decay, all-gathered, and the entering states of this rank's
             two chunks; packed documents are split one at a time, so there n and the 2 are per document,
             which the estimate counts as one per sequence: short documents keep more)
  gdn        + [2T W + 2T c + 4T hv dk + 8T hv + 4T hv C + 4T VD] / t   (W in_proj width, c conv channels,
             C = 64 the delta rule's chunk: in_proj output, conv output, L2-normed q and k at the value
             heads, fp32 decay and norm rstd, the fp32 intra-chunk matrix flash-linear-attention saves,
             core output and gated-norm output = out_proj input)
  attention  + [2T(q + 2kv)hd + 2T q hd + 4T q] / t          (Q, K, V; flash/cuDNN output = proj input;
             fp32 logsumexp). No S^2 term: the fused kernels never store the score matrix. Selective
             recompute (megatron's default module "core_attn") keeps Q, K, V and the output and drops
             only the logsumexp: it targets the unfused S^2 softmax, so on this stack it saves little.
  mlp        + [2T F u + 2T F] / t, u = 2 for swiglu else 1  (fc1 output, activation output = fc2 input)
  moe        + [8T E + 4T k H + 2T k (Fe u + Fe) + 2T S u + 2T S] / t  (fp32 router logits and scores; the
             k routed copies of each token before and after the experts; each expert's fc1 and activation
             outputs; the shared expert as an MLP). Routed experts' weights, grads and optimizer state are
             divided by EP (expert parallelism), their optimizer state by DP x CP / EP instead of DP x CP.
  full recompute (uniform, N = train.recompute_num_layers): 2TH/s per checkpoint of N layers instead.
Per model chunk and micro-batch also 2TH/s for the chunk's output, which megatron's pipeline schedule
keeps until the backward (deallocate_pipeline_outputs=False), except on the model's last chunk.
Micro-batches in flight on pipeline rank r (megatron's warm-up count + 1, capped by the micro-batches
of the step): 1F1B  PP - r;  interleaved (v chunks per rank)  2(PP - r - 1) + (v - 1)PP + 1 chunk
forwards, each counted at the rank's largest chunk. So stage 0 holds PP micro-batches (Korthikanti's
L x PP/PP = L layers); with interleaving (1 + (PP-1)/(PP v)) times that.
Once per GPU (not per micro-batch in flight):
  working set  the largest layer's backward: mamba  [2T W + 2T(di + 2GN) + 4T di N/Q + 4T G Q + 12T nh]/t
               (grad of in_proj output, recomputed conv output, fp32 chunk states and C^T B, dt/dA);
               gdn [2T W + 2T c + 4T hv dk dv/C + 4T hv C]/t (fp32 chunk states recomputed in the backward);
               attention [2T(q + 2kv)hd + 6T q hd + 4Tq]/t; mlp [2T F u + 2T F]/t; plus 4TH/s of
               residual-stream grads and, with sequence parallel, 2TH for the all-gathered GEMM input.
               Full recompute adds the stored activations of the N-layer chunk being recomputed.
  logits       last stage: 6 T V/t (fp32 softmax kept by vocab_parallel_cross_entropy + the bf16 logits
               or their bf16 grad) + 4TH/s for the final norm.
Overhead: 10 GB a process outside PyTorch's allocator (CUDA context, loaded kernel modules, NCCL buffers,
library handles) + 5% of the rest for allocator fragmentation. Measured on an H100 (torch 2.11+cu130, TE
2.20, mamba-ssm 2.3.2): a configs/1b.yaml FP8 process at DP 1, in its first step, had 29.7 GiB reserved
by PyTorch and 39.3 GiB in use in all, so 9.6 GiB (10.3 GB) lay outside the allocator.
An "H100 80GB" has 81,559 MiB = 85.5 GB: judging against 80 GB leaves
that difference as unmodelled slack.
"""

from __future__ import annotations

from dataclasses import dataclass

from data_pipeline.errors import ConfigError
from hybrid_megatron.config import RunConfig
from hybrid_megatron.model import geometry as geo
from hybrid_megatron.model import pattern as pat
from hybrid_megatron.model.config import ModelConfig
from hybrid_megatron.model.flops import GDN_CHUNK

GB = 1e9
GPU_BYTES = 80 * GB
OVERHEAD_BYTES = 10 * GB
FRAGMENTATION = 0.05
FP8_WEIGHT_BYTES = 2  # row-wise + column-wise FP8 copy per GEMM weight (Hopper)


def _norm(m: ModelConfig) -> int:
    return sum(p.numel for p in geo.final_norm(m))


def mamba_mixer_stored(m: ModelConfig, T: int, tp: int, state_passing_chunks: int = 0, rows: int = 1) -> float:
    """Bytes a Mamba mixer keeps for its backward per micro-batch of T tokens on this rank, its input excluded
    (the pre-norm's output, counted with the pre-norm): megatron's fused path, or state passing's when
    ``state_passing_chunks`` (the CP chunks of each of the ``rows`` sequences) is set (legend above)."""
    di, G, N, nh = m.mamba_d_inner, m.mamba_num_groups, m.mamba_state_dim, m.num_mamba_heads
    W = geo.mamba_widths(m).in_proj
    if state_passing_chunks:
        c = di + 2 * G * N
        states = 4 * rows * (state_passing_chunks * (di * N + nh) + 2 * di * N)
        return (2 * T * W + 4 * T * c + 6 * T * di + 4 * T * G + 24 * T * nh + states) / tp + 9 * T
    return (2 * T * W + 3 * 2 * T * di + 4 * T * G) / tp


def layer_activations(m: ModelConfig, symbol: str, T: int, tp: int, s: int, recompute: str, cp: int = 1,
                       state_passing_rows: int = 0) -> tuple[float, float]:
    """(bytes kept until the backward per micro-batch, bytes of the layer's backward working set)."""
    H = m.hidden_size
    stats = 4 * T * (2 if m.normalization == "LayerNorm" else 1)
    stored = (4 * T * H + stats) / s  # pre-norm input and normed GEMM input (+ fp32 statistics)
    if symbol == pat.MAMBA:
        di, G, N, nh, Q = (m.mamba_d_inner, m.mamba_num_groups, m.mamba_state_dim, m.num_mamba_heads,
                           m.mamba_chunk_size)
        W = geo.mamba_widths(m).in_proj
        stored += mamba_mixer_stored(m, T, tp, 2 * cp if state_passing_rows else 0, state_passing_rows)
        work = (2 * T * W + 2 * T * (di + 2 * G * N) + 4 * T * di * N / Q + 4 * T * G * Q + 12 * T * nh) / tp
    elif symbol == pat.GDN:
        w, C = geo.gdn_widths(m), GDN_CHUNK
        hv, dk, dv = w.value_heads, m.gdn_key_head_dim, m.gdn_value_head_dim
        stored += (2 * T * w.in_proj + 2 * T * w.conv + 4 * T * hv * dk + 8 * T * hv + 4 * T * hv * C
                   + 4 * T * w.v) / tp
        work = (2 * T * w.in_proj + 2 * T * w.conv + 4 * T * hv * dk * dv / C + 4 * T * hv * C) / tp
    elif symbol == pat.ATTENTION:
        q, hd = m.num_attention_heads, m.head_dim
        qkv, _ = geo.attention_widths(m)
        lse = 0 if recompute == "selective" else 4 * T * q
        stored += (2 * T * qkv + 2 * T * q * hd + lse) / tp
        work = (2 * T * qkv + 6 * T * q * hd + 4 * T * q) / tp  # dQ/dK/dV, fp32 dQ accumulator, dO
        if cp > 1:  # the ring: the next rank's K and V chunk arriving while this one is used, both ways
            work += 2 * 2 * T * 2 * m.num_kv_heads * hd / tp
    elif symbol == pat.MOE:
        E, k, Fe, S = m.moe_num_experts, m.moe_top_k, m.expert_ffn_hidden_size, m.moe_shared_expert_size or 0
        u = 2 if m.activation == "swiglu" else 1
        layer = (8 * T * E + 4 * T * k * H + 2 * T * k * (Fe * u + Fe) + 2 * T * S * u + 2 * T * S) / tp
        stored += layer
        work = layer
    else:
        F, up = m.ffn_hidden_size, geo.mlp_up_rows(m)
        stored += (2 * T * up + 2 * T * F) / tp
        work = stored - (4 * T * H + stats) / s
    return stored, work


@dataclass(frozen=True, slots=True)
class StageMemory:
    """Bytes one GPU of pipeline rank ``pp_rank`` holds at its peak."""

    pp_rank: int
    weights: float
    fp8_weights: float
    grads: float
    optimizer: float
    activations: float
    in_flight: int  # micro-batches (chunk forwards with interleaving) whose activations are held
    # (layer symbol, layers of it on this stage, bytes one of them keeps per micro-batch without recompute)
    kept_by_layer: tuple[tuple[str, int, float], ...] = ()

    @property
    def allocated(self) -> float:
        return self.weights + self.fp8_weights + self.grads + self.optimizer + self.activations

    @property
    def overhead(self) -> float:
        return OVERHEAD_BYTES + FRAGMENTATION * self.allocated

    @property
    def total(self) -> float:
        return self.allocated + self.overhead


def data_parallel_size(cfg: RunConfig, world_size: int, what: str = "--gpus") -> int:
    """DP = world / (TP x PP x CP); ConfigError naming ``what`` set the world size when that is not whole."""
    par = cfg.parallel
    tp, pp, cp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size
    layout = f"TP {tp} x PP {pp}" + (f" x CP {cp}" if cp > 1 else "")
    if world_size < 1 or world_size % (tp * pp * cp):
        raise ConfigError(f"{what} {world_size}: must be a positive multiple of {layout} = {tp * pp * cp}")
    dp, ep = world_size // (tp * pp * cp), par.expert_model_parallel_size
    if dp % ep:
        raise ConfigError(f"parallel.expert_model_parallel_size={ep} does not divide the data-parallel size {dp} "
                          f"({what} {world_size} / ({layout})): experts are split within the DP group")
    return dp


def in_flight(pp: int, vpp: int, pp_rank: int, num_microbatches: int) -> int:
    """Micro-batch forwards (model-chunk forwards when interleaved) held at once: megatron's warm-up + 1."""
    if pp == 1:
        return 1
    if vpp == 1:
        return min(pp - pp_rank, num_microbatches)
    return min(2 * (pp - pp_rank - 1) + (vpp - 1) * pp + 1, num_microbatches * vpp)


def estimate(cfg: RunConfig, padded_vocab: int, seq_len: int, *, world_size: int) -> list[StageMemory]:
    """Memory of one GPU on each pipeline stage, for sequences of ``seq_len`` (the run's longest)."""
    m, par, prec, train = cfg.model, cfg.parallel, cfg.precision, cfg.train
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    dp = data_parallel_size(cfg, world_size)
    s = tp if par.sequence_parallel else 1
    cp, ep = par.context_parallel_size, par.expert_model_parallel_size
    passing = cp > 1 and par.mamba_context_parallel == "state_passing"
    T, H, V = train.micro_batch_size * seq_len // cp, m.hidden_size, padded_vocab  # this rank's share of the tokens
    bsm = cfg.data.batch_size_multiple
    sequences = cfg.data.global_batch_tokens // seq_len // bsm * bsm
    num_micro = max(1, sequences // dp // train.micro_batch_size)
    stages = pat.split_stages(m.hybrid_layer_pattern, pp)
    vpp = len(stages[0].chunks)
    num_layers = m.num_layers
    bf16_layer = [
        i < prec.fp8_bf16_layers_at_start or i >= num_layers - prec.fp8_bf16_layers_at_end for i in range(num_layers)
    ]
    half = prec.dtype == "bf16"
    fp32_ssm = half and prec.fp32_ssm_params
    out = []
    for stage in stages:
        last = stage.pp_rank == pp - 1
        sharded = replicated = fp32 = fp8_gemm = expert = 0
        if stage.pp_rank == 0:
            sharded += geo.embedding(m, V).numel  # vocab-parallel embedding
        if last:
            replicated += _norm(m)
            if not m.tie_embeddings or pp > 1:
                sharded += geo.output_layer(m, V).numel
        chunk_bytes, work, kept = [], 0.0, {}
        for c, (chunk, first) in enumerate(zip(stage.chunks, stage.first_layer)):
            rows = train.micro_batch_size if passing else 0  # the sequences whose chunk states state passing keeps
            acts = [layer_activations(m, sym, T, tp, s, train.recompute, cp, rows) for sym in chunk]
            for i, sym in enumerate(chunk):
                kept[sym] = (kept.get(sym, (0, 0.0))[0] + 1, acts[i][0])
                p = geo.layer(m, sym)
                expert += p.expert  # routed experts: split over TP (expert TP = TP) and EP
                sharded += p.total - p.replicated - p.expert
                replicated += p.replicated
                fp32 += p.fp32 if fp32_ssm else 0
                fp8_gemm += p.gemm - p.expert + p.expert / ep if prec.fp8 and not bf16_layer[first + i] else 0
            work = max([work] + [w for _, w in acts])
            if train.recompute == "full":
                n = train.recompute_num_layers
                stored = -(-len(chunk) // n) * 2 * T * H / s
                windows = [sum(a for a, _ in acts[i : i + n]) for i in range(0, len(chunk), n)]
                work = max(work, max(w for _, w in acts) + max(windows))
            else:
                stored = sum(a for a, _ in acts)
            model_output = last and c == len(stage.chunks) - 1
            chunk_bytes.append(stored + (0 if model_output else 2 * T * H / s))
        expert_rank = expert / (tp * ep)
        params = sharded / tp + replicated + expert_rank
        fp32_rank = fp32 / tp
        held = in_flight(pp, vpp, stage.pp_rank, num_micro)
        activations = held * max(chunk_bytes) + work + 4 * T * H / s + (2 * T * H if s > 1 else 0)
        if last:
            activations += 6 * T * V / tp + 4 * T * H / s
        state_bytes = 12 if half else 8
        dense = state_bytes * (params - fp32_rank - expert_rank) + 8 * fp32_rank
        experts = state_bytes * expert_rank
        shards = dp * cp  # the distributed optimizer's group: data and context parallel ranks
        out.append(StageMemory(
            pp_rank=stage.pp_rank,
            weights=(2 if half else 4) * (params - fp32_rank) + 4 * fp32_rank,
            fp8_weights=FP8_WEIGHT_BYTES * fp8_gemm / tp,
            grads=4 * params,
            optimizer=dense / shards + experts / (shards // ep) if par.use_distributed_optimizer else dense + experts,
            activations=activations,
            in_flight=held,
            kept_by_layer=tuple((sym, n, b) for sym, (n, b) in kept.items()),
        ))
    return out


def _gb(x: float) -> str:
    return f"{x / GB:.1f} GB" if abs(x) >= GB else f"{x / GB:.2f} GB"


def estimate_lines(cfg: RunConfig, padded_vocab: int, seq_len: int, *, world_size: int = 8) -> list[str]:
    """The dry-run section: layout, one line per pipeline stage, and a verdict against 80 GB."""
    par, train = cfg.parallel, cfg.train
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    dp = data_parallel_size(cfg, world_size)
    stages = estimate(cfg, padded_vocab, seq_len, world_size=world_size)
    cp = f" x CP {par.context_parallel_size}" if par.context_parallel_size > 1 else ""
    optimizer = f"distributed optimizer (sharded over DP {dp}{cp})" if par.use_distributed_optimizer else (
        "optimizer state replicated on every DP rank (use_distributed_optimizer=false)"
    )
    passing = ("; Mamba CP by state passing (unfused conv and scan: more activations per Mamba layer)"
               if cp and par.mamba_context_parallel == "state_passing" else "")
    ep = f" (experts over EP {par.expert_model_parallel_size} of them)" if par.expert_model_parallel_size > 1 else ""
    lines = [
        f"{world_size} GPUs = TP {tp} x PP {pp}{cp} x DP {dp}{ep}; sequence parallel {'on' if par.sequence_parallel else 'off'}; "
        f"{optimizer}; fp8 {cfg.precision.fp8 or 'off'}{passing}"
    ]
    for st in stages:
        weights = _gb(st.weights) + (f" + fp8 copies {_gb(st.fp8_weights)}" if st.fp8_weights else "")
        lines.append(
            f"pp stage {st.pp_rank}: weights {weights} | grads {_gb(st.grads)} | optimizer {_gb(st.optimizer)} | "
            f"activations {_gb(st.activations)} (recompute={train.recompute}, mbs {train.micro_batch_size}, "
            f"seq {seq_len}, {st.in_flight} in flight) | overhead {_gb(st.overhead)} | total {_gb(st.total)}"
        )
    worst = max(stages, key=lambda st: st.total)
    margin = GPU_BYTES - worst.total
    if margin >= 0:
        verdict = f"fits an 80 GB H100 with {_gb(margin)} to spare"
    else:
        remedies = ["raise TP or PP"]
        remedies += [] if par.use_distributed_optimizer else ["use the distributed optimizer"]
        remedies += [] if train.recompute == "full" else ["recompute=full"]
        remedies += ["a smaller micro-batch"] if train.micro_batch_size > 1 else []
        remedies += ["more GPUs"] if par.use_distributed_optimizer else []
        verdict = f"does NOT fit an 80 GB H100 ({_gb(-margin)} over): {', '.join(remedies)}"
    lines.append(f"worst: pp stage {worst.pp_rank}, total {_gb(worst.total)}: {verdict}")
    by_layer = ", ".join(f"{pat.LAYER_SYMBOLS[sym]} {n} x {_gb(b)}" for sym, n, b in worst.kept_by_layer)
    how = ("what each layer would keep without recompute; recompute=full keeps only the layers' inputs"
           if train.recompute == "full" else f"recompute={train.recompute}")
    lines.append(f"activations by layer on pp stage {worst.pp_rank}, per micro-batch: {by_layer} ({how})")
    return lines

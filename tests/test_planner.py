"""The offload planner: real 8x22B tensor sizes on fake memories, and a tiny model end to end."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from gguf_models import write_model

from wizardchat.errors import ExitCode
from wizardchat.gguf_file import read_header
from wizardchat.plan import machine as hardware
from wizardchat.plan.fit import Fit as Plan
from wizardchat.plan.fit import find_fit
from wizardchat.plan.machine import (
    Machine,
    Memory,
    gpu_bandwidth,
    machine_from_devices,
    measure_ram_bandwidth,
)
from wizardchat.plan.search import GIB
from wizardchat.plan.shapes import FitError as PlanError
from wizardchat.plan.shapes import (
    ModelShape,
    shape_from_gguf,
    wizardlm2_8x22b_shape,
)

Q4_K_M = wizardlm2_8x22b_shape("Q4_K_M")


def shape_from_path(path: Path) -> ModelShape:
    """The shape of a GGUF model on disk, all its shards read."""
    from wizardchat.gguf_file import read_header

    return shape_from_gguf(read_header(path))


N = Q4_K_M.n_layer
RAM_BW = 90e9  # dual-channel DDR5


def make_plan(shape: ModelShape, gpus: list[Memory], ram: Memory, **flags: Any) -> Plan:
    """The fit of `shape` on a machine of these memories."""
    return find_fit(shape, Machine(tuple(gpus), ram), **flags)


def memories_from_devices(devices: Any, **given: Any) -> tuple[list[Memory], Memory]:
    machine = machine_from_devices(devices, **given)
    return list(machine.gpus), machine.ram


def gpu(gb: float, bandwidth: float | None = 1e12, name: str = "CUDA0") -> Memory:
    """A GPU of `gb` GiB as cudaMemGetInfo reports it once a CUDA context (~0.5 GiB) exists."""
    return Memory(name, "GPU", int(gb * GIB) - GIB // 2, bandwidth)


def ram(gb: float, bandwidth: float | None = RAM_BW) -> Memory:
    return Memory("RAM", "RAM", int(gb * GIB), bandwidth)


def active_bytes(shape: ModelShape, plan: Plan) -> float:
    """What one token reads: all shared bytes, 2/8 of the experts, the output, KV at ctx/2."""
    kv = shape.kv_bytes_per_token(plan.type_k, plan.type_v) * (plan.n_ctx // 2)
    layers = sum(x.shared + x.experts * shape.n_expert_used / shape.n_expert for x in shape.layers)
    return layers + shape.output_bytes + kv


# ------------------------------------------------------------------ the synthetic 8x22B shape


def test_q4_k_m_total_is_the_published_85_59_gb() -> None:
    assert Q4_K_M.total_bytes == pytest.approx(85.59e9, rel=0.03)
    assert (Q4_K_M.n_layer, Q4_K_M.n_expert, Q4_K_M.n_expert_used) == (56, 8, 2)
    # 224 KiB of f16 KV cache per token (48 query / 8 KV heads of 128)
    assert Q4_K_M.kv_bytes_per_token("f16", "f16") == 224 * 1024


def test_experts_are_most_of_each_layer_and_q6_k_down_makes_28_layers_bigger() -> None:
    assert Q4_K_M.expert_bytes / Q4_K_M.total_bytes > 0.95
    for layer in Q4_K_M.layers:
        assert layer.experts > 20 * layer.shared
        assert 1.3e9 < layer.experts < 1.6e9  # ~1.47 GB per layer
    sizes = sorted({layer.experts for layer in Q4_K_M.layers})
    assert len(sizes) == 2  # ffn_down_exps in Q4_K or Q6_K (llama.cpp's use_more_bits)
    assert sum(layer.experts == sizes[1] for layer in Q4_K_M.layers) == 28


def test_one_token_reads_about_24_gb_of_weights_at_q4_k_m() -> None:
    reads = sum(x.shared + x.experts / 4 for x in Q4_K_M.layers) + Q4_K_M.output_bytes
    assert 22e9 < reads < 25e9  # ~39 B active parameters at ~4.9 bits


@pytest.mark.parametrize(("quant", "published"), [("Q2_K", 52.1e9), ("Q8_0", 149.4e9)])
def test_other_quants_match_their_published_sizes(quant: str, published: float) -> None:
    assert wizardlm2_8x22b_shape(quant).total_bytes == pytest.approx(published, rel=0.03)


# ------------------------------------------------------------------ one GPU, the grid


def _plan_or_error(gpu_gb: int, ram_gb: int, ctx: int, kv: str) -> Plan | PlanError:
    try:
        return make_plan(Q4_K_M, [gpu(gpu_gb)], ram(ram_gb), n_ctx=ctx, type_k=kv, type_v=kv)
    except PlanError as e:
        return e


def _fits(plan: Plan, ngl: int, moe: int, ctx: int = 0) -> bool:
    """Whether explicit flags fit, by the planner's own arithmetic (at the plan's context)."""
    gpus = [u.memory for u in plan.memories if u.memory.kind != "RAM"]
    ram_memory = plan.memories[-1].memory
    try:
        return make_plan(
            Q4_K_M,
            gpus,
            ram_memory,
            n_ctx=ctx or plan.n_ctx,
            type_k=plan.type_k,
            type_v=plan.type_v,
            n_gpu_layers=ngl,
            n_cpu_moe=moe,
            fixed_ctx=True,
        ).fits
    except PlanError:  # not even the totals fit
        return False


@pytest.mark.parametrize("kv", ["f16", "q8_0"])
@pytest.mark.parametrize("ctx", [8192, 16384, 65536])
@pytest.mark.parametrize("ram_gb", [64, 128, 256])
@pytest.mark.parametrize("gpu_gb", [24, 48, 80, 141])
def test_preference_order(gpu_gb: int, ram_gb: int, ctx: int, kv: str) -> None:
    plan = _plan_or_error(gpu_gb, ram_gb, ctx, kv)
    assert isinstance(plan, Plan), plan  # every one of these machines holds the model somehow
    assert plan.fits and all(u.fits for u in plan.memories)
    ngl, moe = plan.n_gpu_layers, plan.n_cpu_moe
    assert _fits(plan, ngl, moe)
    if ngl == N + 1:
        if moe:  # the fewest expert layers in RAM: one fewer does not fit
            assert not _fits(plan, ngl, moe - 1)
    else:  # (3): not even one more GPU layer fits, whatever n_cpu_moe
        assert not any(_fits(plan, ngl + 1, m) for m in range(N + 1))
    if plan.ctx_reduced:
        # the context before the last halving fits in no arrangement at all
        twice = plan.n_ctx * 2
        assert not any(_fits(plan, g, m, twice) for g in range(N + 2) for m in range(N + 1))
    if gpu_gb == 141:
        assert (ngl, moe, plan.n_ctx) == (N + 1, 0, ctx)
        cuda = plan.memories[0]  # everything but token_embd, which llama.cpp keeps on the CPU
        assert plan.placement == (("CUDA0", cuda.weights + cuda.kv), ("RAM", Q4_K_M.input_bytes))
    if gpu_gb == 80 and ram_gb >= 128:
        assert ngl == N + 1 and 1 <= moe <= 16
    if gpu_gb == 24 and ram_gb >= 128:
        # the shared part and the KV cache fit in 24 GB: every layer on the GPU, most experts not
        assert ngl == N + 1 and moe > N // 2


def test_80_gb_gpu_keeps_a_few_expert_layers_in_ram() -> None:
    plan = make_plan(Q4_K_M, [gpu(80, 3.35e12)], ram(128), n_ctx=16384)
    assert plan.n_gpu_layers == N + 1
    assert plan.experts_in_ram == tuple(range(plan.n_cpu_moe))
    cuda, host = plan.memories
    assert host.expert_layers == tuple(range(plan.n_cpu_moe))
    assert cuda.expert_layers == tuple(range(plan.n_cpu_moe, N))
    assert cuda.layers == tuple(range(N)) and cuda.output and host.input
    assert cuda.kv == Q4_K_M.kv_bytes_per_token("f16", "f16") * 16384
    assert host.kv == 0
    # llama.cpp's own flags for it
    assert plan.flags().startswith(f"-ngl {N + 1} --n-cpu-moe {plan.n_cpu_moe} -c 16384")


def test_q8_0_kv_needs_fewer_expert_layers_in_ram_and_the_f16_plan_says_so() -> None:
    f16 = make_plan(Q4_K_M, [gpu(80)], ram(128), n_ctx=65536)
    q8 = make_plan(Q4_K_M, [gpu(80)], ram(128), n_ctx=65536, type_k="q8_0", type_v="q8_0")
    assert q8.n_cpu_moe < f16.n_cpu_moe
    assert any("q8_0" in note and "more layers on the GPU" in note for note in f16.notes)
    assert not any("q8_0 KV" in note for note in q8.notes)


def test_small_gpu_offloads_fewer_layers_with_all_their_experts_in_ram() -> None:
    plan = make_plan(Q4_K_M, [gpu(8)], ram(256), n_ctx=65536)
    assert 0 < plan.n_gpu_layers < N
    assert plan.n_cpu_moe == N  # no GPU room for experts at all
    cuda = plan.memories[0]
    first = N - plan.n_gpu_layers
    assert cuda.layers == tuple(range(first, N))  # llama.cpp offloads the last layers
    assert not cuda.output and not cuda.expert_layers
    assert not _fits(plan, plan.n_gpu_layers + 1, N)
    assert f"{plan.n_gpu_layers}/56 layers on CUDA0" in plan.one_line()
    assert f"layers 0-{first - 1} and output in RAM" in plan.one_line()


def test_context_is_halved_when_65536_does_not_fit_and_q8_0_is_suggested() -> None:
    plan = make_plan(Q4_K_M, [gpu(24)], ram(64), n_ctx=65536)
    assert plan.ctx_reduced and plan.requested_ctx == 65536
    assert plan.n_ctx in (32768, 16384, 8192, 4096)
    assert any(n.startswith("context reduced from 65536") for n in plan.notes)
    assert any("q8_0" in n and "flash attention" in n for n in plan.notes)
    assert f"ctx {plan.n_ctx} (asked 65536)" in plan.one_line()
    with pytest.raises(PlanError):  # twice the context fits in no arrangement
        make_plan(Q4_K_M, [gpu(24)], ram(64), n_ctx=plan.n_ctx * 2, fixed_ctx=True)


def test_context_is_not_reduced_below_min_ctx() -> None:
    with pytest.raises(PlanError, match="at ctx 8192"):
        make_plan(Q4_K_M, [gpu(24)], ram(60), n_ctx=65536, min_ctx=8192)


def test_too_small_a_machine_is_an_error_with_the_numbers() -> None:
    memory = [Memory("CUDA0", "GPU", 24 * 10**9)]
    with pytest.raises(PlanError) as caught:
        make_plan(Q4_K_M, memory, Memory("RAM", "RAM", 32 * 10**9), n_ctx=16384)
    message = str(caught.value)
    assert "85.6 GB weights" in message
    assert "this machine has 32.0 GB RAM + 24.0 GB GPU" in message
    assert caught.value.exit_code == ExitCode.LOAD_FAILED


# ------------------------------------------------------------------ no GPU, several, RPC


def test_cpu_only_plan_puts_everything_in_ram() -> None:
    plan = make_plan(Q4_K_M, [], ram(256), n_ctx=16384)
    assert (plan.n_gpu_layers, plan.n_cpu_moe, plan.n_ctx) == (0, 0, 16384)
    (host,) = plan.memories
    assert host.weights == Q4_K_M.total_bytes
    assert host.layers == tuple(range(N)) and host.output
    assert plan.decode_bound == pytest.approx(RAM_BW / active_bytes(Q4_K_M, plan), rel=1e-6)
    assert plan.one_line().startswith("plan: all 56 layers in RAM, ctx 16384, KV f16, ~3.")
    assert any("no GPU" in n for n in plan.notes)


def test_cpu_only_plan_may_exceed_free_ram_up_to_the_total_with_a_note() -> None:
    with pytest.raises(PlanError, match="and no GPU"):
        make_plan(Q4_K_M, [], ram(64), n_ctx=16384)
    host = Memory("RAM", "RAM", 64 * GIB, RAM_BW, total_bytes=128 * GIB)
    plan = make_plan(Q4_K_M, [], host, n_ctx=16384)
    assert plan.fits
    assert any("exceeds the free RAM" in n and "memory-mapped" in n for n in plan.notes)


def test_two_gpus_split_layers_by_free_memory_like_llama_cpp() -> None:
    gpus = [gpu(24, name="CUDA0"), gpu(48, name="CUDA1")]
    plan = make_plan(Q4_K_M, gpus, ram(128), n_ctx=16384)
    assert plan.n_gpu_layers == N + 1
    first, second, _ = plan.memories
    share = gpus[0].free_bytes / (gpus[0].free_bytes + gpus[1].free_bytes)
    assert plan.tensor_split == pytest.approx((share, 1 - share))
    # layer il goes to the first device whose cumulative share exceeds il / (n_layer + 1)
    on_first = [il for il in range(N) if il / (N + 1) < share]
    assert first.layers == tuple(on_first)
    assert second.layers == tuple(range(len(on_first), N)) and second.output
    assert first.fits and second.fits
    assert not _fits(plan, N + 1, plan.n_cpu_moe - 1)
    assert "56/56 layers on CUDA0 (0-" in plan.one_line() and " + CUDA1 (" in plan.one_line()


def test_an_rpc_server_counts_like_a_gpu_and_its_unknown_bandwidth_leaves_no_bound() -> None:
    rpc = Memory("RPC[10.0.0.2:50052]", "RPC", 64 * GIB)
    plan = make_plan(Q4_K_M, [gpu(48, 1e12), rpc], ram(128), n_ctx=16384)
    assert plan.n_gpu_layers == N + 1
    assert dict(plan.placement)["RPC[10.0.0.2:50052]"] > 40e9
    assert plan.decode_bound is None
    assert "RPC[10.0.0.2:50052] (" in plan.one_line()
    assert plan.one_line().endswith("KV f16")  # no bound, and no words about its absence


def test_an_unknown_bound_is_left_out_of_every_line_not_announced() -> None:
    plan = make_plan(Q4_K_M, [gpu(80, 3.35e12)], ram(128, bandwidth=None), n_ctx=16384)
    assert plan.decode_bound is None
    text = "\n".join([plan.one_line(), *(f"{k} {v}" for k, v in plan.rows())])
    assert "bound" not in text and "unknown" not in text, text
    assert "RAM " in dict(plan.rows())["read per token"]
    known = make_plan(Q4_K_M, [gpu(80, 3.35e12)], ram(128), n_ctx=16384)
    assert known.one_line().endswith(f"~{known.decode_bound:.0f} tok/s bound")
    assert dict(known.rows())["decode bound"].startswith(f"~{known.decode_bound:.0f} tok/s")


# ------------------------------------------------------------------ bytes per token and bounds


def test_all_gpu_bound_is_bandwidth_over_active_bytes() -> None:
    q2 = wizardlm2_8x22b_shape("Q2_K")  # 52 GB: fits an 80 GB H100 whole
    plan = make_plan(q2, [gpu(80, 3.35e12)], ram(128), n_ctx=8192)
    assert (plan.n_gpu_layers, plan.n_cpu_moe) == (N + 1, 0)
    assert plan.read_per_token == (("CUDA0", pytest.approx(active_bytes(q2, plan), abs=1)),)
    assert plan.decode_bound == pytest.approx(3.35e12 / active_bytes(q2, plan), rel=1e-6)

    h200 = make_plan(Q4_K_M, [gpu(141, 4.8e12)], ram(128), n_ctx=8192)
    assert h200.decode_bound == pytest.approx(4.8e12 / active_bytes(Q4_K_M, h200), rel=1e-6)
    assert 150 < h200.decode_bound < 210  # the research notes: 188 at 8K


def test_hybrid_bound_adds_the_time_of_each_memory() -> None:
    plan = make_plan(Q4_K_M, [gpu(24, 1.008e12)], ram(128, 200e9), n_ctx=16384)
    reads = dict(plan.read_per_token)
    assert sum(reads.values()) == pytest.approx(active_bytes(Q4_K_M, plan), abs=2)
    assert plan.decode_bound == pytest.approx(
        1 / (reads["CUDA0"] / 1.008e12 + reads["RAM"] / 200e9)
    )
    expert_reads = sum(Q4_K_M.layers[i].experts for i in range(plan.n_cpu_moe)) / 4
    assert reads["RAM"] == pytest.approx(expert_reads, abs=1)


@pytest.mark.parametrize("where", ["gpu", "ram"])
def test_no_bound_when_a_used_memory_has_no_known_bandwidth(where: str) -> None:
    device = gpu(80, None if where == "gpu" else 3.35e12)
    host = ram(128, None if where == "ram" else RAM_BW)
    plan = make_plan(Q4_K_M, [device], host, n_ctx=16384)
    assert plan.decode_bound is None
    assert plan.read_per_token  # the bytes are still there


def test_unknown_ram_bandwidth_does_not_matter_when_ram_is_not_read() -> None:
    plan = make_plan(Q4_K_M, [gpu(141, 4.8e12)], ram(128, None), n_ctx=16384)
    assert [name for name, _ in plan.read_per_token] == ["CUDA0"]
    assert plan.decode_bound is not None


# ------------------------------------------------------------------ flags and attention


def test_explicit_flags_override_the_plan_and_say_when_they_do_not_fit() -> None:
    plan = make_plan(Q4_K_M, [gpu(24)], ram(128), n_ctx=16384, n_gpu_layers=-1, n_cpu_moe=0)
    assert (plan.n_gpu_layers, plan.n_cpu_moe, plan.fits) == (N + 1, 0, False)
    assert any("the given flags do not fit: CUDA0 needs" in n for n in plan.notes)
    assert plan.one_line().endswith("(over memory: loading may fail)")
    # only n_cpu_moe given: the planner finds the GPU layers around it
    partial = make_plan(Q4_K_M, [gpu(24)], ram(128), n_ctx=16384, n_cpu_moe=N)
    assert partial.fits and (partial.n_gpu_layers, partial.n_cpu_moe) == (N + 1, N)


def test_quantized_v_forces_flash_attention_and_bad_names_are_usage_errors() -> None:
    plan = make_plan(Q4_K_M, [gpu(141)], ram(128), n_ctx=8192, type_v="q8_0", flash_attn="off")
    assert plan.flash_attn
    assert any("flash attention on" in n for n in plan.notes)
    off = make_plan(Q4_K_M, [gpu(141)], ram(128), n_ctx=8192, flash_attn="off")
    assert not off.flash_attn and "flash attn off" in off.one_line()
    from wizardchat.errors import UsageError

    with pytest.raises(UsageError):
        make_plan(Q4_K_M, [gpu(141)], ram(128), n_ctx=8192, type_k="q3_k")
    with pytest.raises(UsageError):
        make_plan(Q4_K_M, [gpu(141)], ram(128), n_ctx=8192, flash_attn="yes")


def test_flash_attention_off_needs_a_bigger_compute_margin() -> None:
    on = make_plan(Q4_K_M, [gpu(48)], ram(128), n_ctx=65536)
    off = make_plan(Q4_K_M, [gpu(48)], ram(128), n_ctx=65536, flash_attn="off")
    assert off.memories[0].reserve > on.memories[0].reserve + 5e9  # 64K x 512 x 48 heads x f32
    assert off.n_cpu_moe > on.n_cpu_moe


# ------------------------------------------------------------------ one_line and rows


def test_one_line_and_rows() -> None:
    plan = make_plan(Q4_K_M, [gpu(80, 3.35e12)], ram(128, 200e9), n_ctx=16384)
    line = plan.one_line()
    last = plan.n_cpu_moe - 1
    assert line.startswith(f"plan: 56/56 layers on CUDA0, experts of layers 0-{last} in RAM,")
    assert ", ctx 16384, KV f16, ~" in line and line.endswith(" tok/s bound")
    rows = dict(plan.rows())
    assert rows["llama.cpp flags"] == plan.flags()
    assert rows["context"] == "16384 tokens"
    assert rows["KV cache"].startswith("f16, 3.8 GB (224 KiB/token)")
    assert "layers 0-55; experts of layers" in rows["CUDA0"] and "output" in rows["CUDA0"]
    assert f"experts of layers 0-{last}" in rows["RAM"]
    assert "CUDA0" in rows["read per token"] and "at 3.35 TB/s" in rows["read per token"]
    assert "RAM" in rows["read per token"] and "at 200 GB/s" in rows["read per token"]
    assert rows["decode bound"].startswith("~")

    full = make_plan(
        Q4_K_M, [gpu(141, 4.8e12)], ram(128), n_ctx=16384, type_k="q8_0", type_v="q8_0"
    )
    assert full.one_line().startswith("plan: 56/56 layers on CUDA0, ctx 16384, KV q8_0, ~1")
    assert "experts" not in full.one_line()


# ------------------------------------------------------------------ devices and bandwidths


@pytest.mark.parametrize(
    ("description", "bandwidth"),
    [
        ("NVIDIA H100 80GB HBM3", 3.35e12),
        ("NVIDIA H100 PCIe", 2.0e12),
        ("NVIDIA H200", 4.8e12),
        ("NVIDIA GH200 480GB", 4.0e12),
        ("NVIDIA A100-SXM4-80GB", 2.0e12),
        ("NVIDIA A100-PCIE-40GB", 1.555e12),
        ("NVIDIA GeForce RTX 4090", 1.008e12),
        ("NVIDIA GeForce RTX 3090 Ti", 1.008e12),
        ("NVIDIA GeForce RTX 3090", 0.936e12),
        ("NVIDIA L40S", 0.864e12),
        ("NVIDIA L4", 0.3e12),
        ("Apple M2 Ultra", 0.8e12),
        ("Some Future Accelerator", None),
    ],
)
def test_gpu_bandwidth_table(description: str, bandwidth: float | None) -> None:
    assert gpu_bandwidth(description) == bandwidth


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    name: str
    description: str
    kind: str
    free_bytes: int


def test_memories_from_devices() -> None:
    devices = [
        FakeDevice("CPU", "AMD EPYC", "CPU", 500 * GIB),
        FakeDevice("CUDA0", "NVIDIA H100 80GB HBM3", "GPU", 79 * GIB),
        FakeDevice("RPC[10.0.0.2:50052]", "10.0.0.2:50052", "GPU", 60 * GIB),
    ]
    gpus, host = memories_from_devices(devices, ram_bandwidth=300e9, host=(100 * GIB, 128 * GIB))
    assert gpus == [
        Memory("CUDA0", "GPU", 79 * GIB, 3.35e12),
        Memory("RPC[10.0.0.2:50052]", "RPC", 60 * GIB),
    ]
    assert host == Memory("RAM", "RAM", 100 * GIB, 300e9, 128 * GIB)
    assert host.limit == 128 * GIB
    # unified memory: what the Apple GPU may take is not RAM left for the CPU too
    apple = [FakeDevice("Metal", "Apple M2 Ultra", "GPU", 147 * GIB)]
    gpus, host = memories_from_devices(apple, host=(180 * GIB, 192 * GIB))
    assert gpus[0].bandwidth == 0.8e12
    assert (host.free_bytes, host.total_bytes) == (33 * GIB, 45 * GIB)


def test_measure_ram_bandwidth_gives_an_order_of_magnitude() -> None:
    assert 1e8 < measure_ram_bandwidth(0.02, size=16 << 20) < 1e13


# ------------------------------------------------------------------ real GGUF headers


def test_shape_from_gguf_sums_the_tensors_of_a_generated_model(tmp_path: Path) -> None:
    path = write_model(tmp_path / "tiny.gguf", flavour="random", n_layer=3)
    info = read_header(path)
    shape = shape_from_gguf(info)
    assert shape.total_bytes == sum(t.nbytes or 0 for t in info.tensors)
    assert (shape.n_layer, len(shape.layers), shape.n_expert, shape.n_expert_used) == (3, 3, 8, 2)
    assert (shape.n_embd, shape.n_head, shape.n_head_kv, shape.head_dim) == (64, 4, 2, 16)
    by_name = {t.name: t.nbytes or 0 for t in info.tensors}
    for i, layer in enumerate(shape.layers):
        experts = sum(by_name[f"blk.{i}.ffn_{k}_exps.weight"] for k in ("gate", "up", "down"))
        assert layer.experts == experts == 3 * 8 * 128 * 64 * 4
        assert (
            layer.shared
            == sum(v for k, v in by_name.items() if k.startswith(f"blk.{i}.")) - experts
        )
    assert shape.input_bytes == by_name["token_embd.weight"]
    assert shape.output_bytes == by_name["output.weight"] + by_name["output_norm.weight"]
    for kv, per_row in (("f16", 2 * 2 * 16), ("q8_0", 34)):  # 2 KV heads of 16, K and V
        assert shape.kv_bytes_per_token(kv, kv) == 3 * 2 * per_row


def test_shape_of_a_split_model_counts_every_shard(tmp_path: Path) -> None:
    (tmp_path / "split").mkdir()
    whole = write_model(tmp_path / "whole.gguf", flavour="random")
    first = write_model(tmp_path / "split" / "m.gguf", flavour="random", split_max_tensors=8)
    assert first.name.endswith("-00001-of-00003.gguf")
    assert shape_from_path(first).layers == shape_from_path(whole).layers
    assert shape_from_path(first).total_bytes == shape_from_path(whole).total_bytes


def test_tiny_model_plan_loads_and_runs_on_the_cpu(tmp_path: Path) -> None:
    import llama_cpp

    path = write_model(tmp_path / "tiny.gguf", flavour="random")
    shape = shape_from_path(path)
    available, total = hardware.host_memory()
    host = Memory("RAM", "RAM", available, None, total)
    plan = make_plan(shape, [], host, n_ctx=1024, min_ctx=256)
    assert (plan.n_gpu_layers, plan.n_cpu_moe, plan.n_ctx, plan.fits) == (0, 0, 1024, True)
    assert plan.placement == (
        ("RAM", shape.total_bytes + shape.kv_bytes_per_token("f16", "f16") * 1024),
    )
    assert plan.one_line().startswith("plan: all 2 layers in RAM, ctx 1024, KV f16")
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=plan.n_ctx,
        n_gpu_layers=plan.n_gpu_layers,
        flash_attn=plan.flash_attn,
        n_threads=2,
        verbose=False,
    )
    try:
        assert llm.n_ctx() == plan.n_ctx
        tokens = llm.tokenize(b"Hello world", add_bos=True)
        llm.eval(tokens)
        assert llm.n_tokens == len(tokens)
    finally:
        llm.close()


def test_a_shape_from_a_file_size_lays_the_bytes_out_like_the_real_tensors() -> None:
    from wizardchat.plan.shapes import CATALOG_DIMS, shape_from_size

    sized = shape_from_size(CATALOG_DIMS["wizardlm2-8x22b"], Q4_K_M.total_bytes)
    assert sized.total_bytes == pytest.approx(Q4_K_M.total_bytes, rel=1e-6)
    assert sized.expert_bytes == pytest.approx(Q4_K_M.expert_bytes, rel=0.03)
    assert sized.kv_bytes_per_token("f16", "f16") == Q4_K_M.kv_bytes_per_token("f16", "f16")
    seven = shape_from_size(CATALOG_DIMS["wizardlm2-7b"], 4_368_438_944)  # dense: no experts
    assert seven.n_layer == 32 and seven.expert_bytes == 0 and seven.active_fraction == 1.0
    plan = make_plan(seven, [], ram(32), n_ctx=8192)
    assert plan.one_line().startswith("plan: all 32 layers in RAM")

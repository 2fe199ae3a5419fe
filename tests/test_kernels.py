"""nano_kernels/: every C++ kernel of nano_kernels/csrc against the plain torch code it replaces,
the module swaps (linear layers, norms) against the modules they replace, 04's attention backend
with the kernels, the huge-page memory, and what happens where the C++ cannot be built.

Where a C++ compiler is present the extension must build (an assertion, not a skip); the bf16
prompt kernel's tests skip only on a CPU without AVX512-BF16 (the extension has it only there)."""
import copy
import fcntl
import mmap
import os
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import nano_kernels
import nano_kernels.attention as A
import nano_kernels.extension as X
from conftest import HAS_COMPILER, NEEDS_COMPILER, ROOT, built_cpu_extension, load
from nano_kernels.linear import GEMVLinear, OneDNNLinear, SmallBatchLinear, use_cpu_linear_kernels
from nano_kernels.memory import HUGE_PAGE, huge_page_allocator, huge_page_zeros
from nano_kernels.norm import FusedNormRoPEAttention, FusedRMSNorm, use_cpu_norm_kernel
from test_04_paged_attention import dense_reference, paged_layout

P = load("04_paged_attention")
M = load("02_model")


# ----------------------------------------------------------------------------- the build


def test_a_compiler_here_builds_the_extension():
    """The skips below are honest: with a compiler the build succeeded, and on a CPU with bf16 dot
    products it holds the prompt kernel (elsewhere it must not: it is compiled only for them)."""
    ext = built_cpu_extension()
    for name in ("paged_decode", "paged_decode_step", "gemv", "rms_norm", "norm_and_rotate"):
        assert hasattr(ext, name), name
    assert hasattr(ext, "causal_attention") == M.cpu_has_bf16()
    assert hasattr(torch.ops.nano_vllm_cpu, "gemv") and hasattr(torch.ops.nano_vllm_cpu, "paged_decode_step")


def test_kernel_that_cannot_be_built_falls_back_with_a_warning(monkeypatch):
    """No compiler or no ninja: one warning, and None (every fast path then stays off, below)."""
    import torch.utils.cpp_extension as cpp

    def no_ninja(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")
    monkeypatch.setattr(cpp, "load", no_ninja)
    with pytest.warns(UserWarning, match="Ninja is required") as warned:
        assert X.cpu_extension.__wrapped__() is None
    assert len(warned) == 1


def test_without_the_extension_no_fast_path_is_plugged_in(no_extension):
    """What plug_in does where the C++ cannot be built: no module that calls it, no C++ attention;
    the batched linear modules (torch's own GEMMs) may stay."""
    model = M.Qwen3ForCausalLM(M.PRESETS["tiny"]).eval()
    fast = nano_kernels.plug_in(model, torch.device("cpu"), torch.float32, 16)
    assert fast.attention is None and not fast.decode_kernel and not fast.prefill_kernel and not fast.norms
    assert fast.linear in ("SmallBatchLinear", "OneDNNLinear")
    assert not any(isinstance(m, (GEMVLinear, FusedRMSNorm, FusedNormRoPEAttention)) for m in model.modules())
    assert A.cpu_attention(16, 8, 128, 16, torch.bfloat16, torch.device("cpu")) is None
    assert not use_cpu_norm_kernel(M.Qwen3ForCausalLM(M.PRESETS["tiny"]), torch.float32)


def processes_in(folder) -> list[str]:
    """Processes (other than zombies) working in `folder` or naming it on their command line: a
    build's child, its ninja, its compilers."""
    folder, found = str(folder), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:                                   # gone, a zombie, not ours to read
            continue
        if cwd.startswith(folder) or folder in cmdline:
            found.append(f"{pid}: {cmdline[:200]}")
    return found


@NEEDS_COMPILER
def test_a_stale_torch_lock_does_not_block_the_next_build(tmp_path):
    """A build killed half-way leaves torch's `lock` file in its folder; torch alone would wait on
    it forever. The next process (here: the built extension's folder copied, with a `lock`) loads."""
    built_cpu_extension()
    from torch.utils import cpp_extension
    name = X.extension_name()
    built = cpp_extension._get_build_directory(name, verbose=False)
    with open(os.path.join(built, "build.flock"), "w") as guard:       # no build under way while it is copied
        X.take_lock(guard, 300)
        shutil.copytree(built, tmp_path / name, ignore=shutil.ignore_patterns("lock", "build.flock", "*.tmp"))
    (tmp_path / name / "lock").write_text("")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", "from nano_kernels.extension import cpu_extension\n"
                           "assert cpu_extension() is not None and hasattr(cpu_extension(), 'gemv')"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "could not be built" not in done.stderr and "building" not in done.stderr    # loaded, not rebuilt
    assert not (tmp_path / name / "lock").exists()


@pytest.mark.parametrize("bound", [0.01, pytest.param(10, marks=NEEDS_COMPILER)])
def test_a_build_past_its_bound_falls_back_with_a_warning(bound, tmp_path, monkeypatch, capsys):
    """NANO_VLLM_BUILD_TIMEOUT bounds a build: past it, one warning and None, and nothing of the
    build is left running: 0.01 s stops the child as it starts, 10 s stops ninja and the compilers
    mid-build."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("NANO_VLLM_BUILD_TIMEOUT", str(bound))
    start = time.monotonic()
    with pytest.warns(UserWarning, match=f"did not finish within {bound:g} s") as warned:
        assert X.cpu_extension.__wrapped__() is None
    assert len(warned) == 1
    assert time.monotonic() - start < bound + 30                     # the child starts (~s) and is stopped in <= 5 s
    assert "building nano_kernels/csrc" in capsys.readouterr().err
    deadline = time.monotonic() + 5                                   # compilers take ninja's SIGTERM as it exits
    while processes_in(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_in(tmp_path) == []
    assert not (tmp_path / X.extension_name() / f"{X.extension_name()}.so").exists()


def test_waiting_for_another_build_is_bounded(tmp_path, monkeypatch, capsys):
    """Another process holds the build folder's flock (a live build): this one waits at most the
    bound, then falls back with one warning."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("NANO_VLLM_BUILD_TIMEOUT", "0.3")
    folder = tmp_path / X.extension_name()
    folder.mkdir()
    with open(folder / "build.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.warns(UserWarning, match="another process held its build folder for over 0.3 s") as warned:
            assert X.cpu_extension.__wrapped__() is None
    assert len(warned) == 1
    assert "waiting for another process's build" in capsys.readouterr().err
    assert not list(folder.glob("*.so"))


def test_build_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("NANO_VLLM_BUILD_TIMEOUT", raising=False)
    assert X.build_timeout() == 600
    monkeypatch.setenv("NANO_VLLM_BUILD_TIMEOUT", "42.5")
    assert X.build_timeout() == 42.5
    for bad in ("", "soon", "0", "-1", "inf", "nan"):
        monkeypatch.setenv("NANO_VLLM_BUILD_TIMEOUT", bad)
        with pytest.raises(ValueError, match="NANO_VLLM_BUILD_TIMEOUT"):
            X.build_timeout()


def test_a_library_is_rebuilt_when_stale_or_built_with_another_key(tmp_path):
    """No library, a source newer than it, or another build.key (another torch, Python, flags):
    a build (then of every object: ninja would only relink objects of another torch). No key
    (a folder from before keys): trusted, as torch itself does."""
    name = "nano_vllm_cpu_test"
    library, obj, key = tmp_path / f"{name}.so", tmp_path / "gemv.o", tmp_path / "build.key"
    assert X.needs_build(str(tmp_path), name, "k")
    library.write_bytes(b"")
    obj.write_bytes(b"")
    assert not X.needs_build(str(tmp_path), name, "k")
    key.write_text("k")
    assert not X.needs_build(str(tmp_path), name, "k")
    os.utime(library, (0, 0))                                         # older than the sources
    assert X.needs_build(str(tmp_path), name, "k") and library.exists()
    os.utime(library)
    key.write_text("built by another torch")
    assert X.needs_build(str(tmp_path), name, "k")
    assert not library.exists() and not obj.exists()


@NEEDS_COMPILER
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_attention_takes_the_kernels_that_apply(dtype):
    """Qwen3's heads: the decode kernel in fp32 and bf16; the prompt kernel for bf16 on a CPU with
    bf16 dot products. Shapes the decode kernel was not written for: none of it."""
    built_cpu_extension()
    cpu = torch.device("cpu")
    backend = A.cpu_attention(16, 8, 128, 16, dtype, cpu)
    assert backend.batches_decode_rows and backend.prefill == (dtype == torch.bfloat16 and M.cpu_has_bf16())
    assert A.cpu_attention(16, 8, 128, 16, torch.float16, cpu) is None
    assert A.cpu_attention(16, 8, 24, 16, torch.float32, cpu) is None            # head size not a multiple of 16
    assert A.cpu_attention(12, 4, 128, 16, torch.float32, cpu) is None           # 3 query heads per KV head


# ----------------------------------------------------------------------------- decode attention (paged_decode.cpp)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("H,n_kv,d", [(16, 8, 128), (32, 8, 128), (8, 8, 64), (8, 1, 16)])
@pytest.mark.parametrize("block_size", [1, 16, 64])
@NEEDS_COMPILER
def test_kernel_equals_reference(dtype, tol, H, n_kv, d, block_size):
    """The kernel on the shapes it was written for (Qwen3's heads among them), at context lengths on
    and around block boundaries, in a NaN-filled pool: any read outside the tables shows."""
    ext = built_cpu_extension()
    lens = [1, block_size, block_size + 1, 3 * block_size - 1, 130]
    seqs, kc, vc, bt, ctx = paged_layout(lens, [1] * len(lens), H, n_kv, d, block_size, dtype=dtype, seed=6)
    q = 4 * torch.stack([s[0][-1] for s in seqs])                              # (B, H, d), peaked scores
    out = ext.paged_decode(q, kc, vc, bt, ctx)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), P.decode_attention_reference(q, kc, vc, bt, ctx).float(), atol=tol, rtol=tol)


@NEEDS_COMPILER
def test_kernel_checks_every_index_before_reading():
    ext = built_cpu_extension()
    seqs, kc, vc, bt, ctx = paged_layout([5, 20], [1, 1], 4, 2, 16, 16)
    q = torch.stack([s[0][-1] for s in seqs])
    for tables, lens, what in ((bt.clone().fill_(kc.shape[0]), ctx, "block id"), (bt, ctx + 100, "context_len"),
                               (bt, ctx * 0, "context_len")):
        with pytest.raises(RuntimeError, match=what):
            ext.paged_decode(q, kc, vc, tables, lens)


@NEEDS_COMPILER
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_op_stores_then_attends_like_04(dtype):
    """The CPU decode step's attention op (eager and compiled): the step's k/v land in their slots
    exactly as 04's store_kvcache puts them (a 1-token context attends to its own token only), each
    real row attends like the reference, a padding row (context 0, slot -1) gives zeros and writes nothing."""
    built_cpu_extension()
    torch.manual_seed(0)
    layers, num_blocks, n_kv, bs, d, H = 3, 20, 2, 4, 64, 8
    kv = torch.randn(layers, 2, num_blocks, n_kv, bs, d, dtype=dtype)
    expected_kv = kv.clone()
    tables = torch.tensor([[3, 7, -1, -1], [1, 2, 4, -1], [9, -1, -1, -1]])
    lens = torch.tensor([5, 9, 1])                                           # the new token is each one's last
    slots = torch.stack([tables[b, (n - 1) // bs] * bs + (n - 1) % bs for b, n in enumerate(lens.tolist())])
    q, k = torch.randn(4, H, d, dtype=dtype), torch.randn(4, n_kv, d, dtype=dtype)
    v = torch.randn_like(k)
    out = torch.ops.nano_vllm_cpu.paged_decode_step(
        q, k, v, kv, 1, torch.cat([slots, torch.tensor([-1])]), torch.cat([tables, torch.full((1, 4), -1)]),
        torch.cat([lens, torch.tensor([0])]))
    P.store_kvcache(k[:3], v[:3], expected_kv[1, 0], expected_kv[1, 1], slots)
    assert torch.equal(kv, expected_kv)
    reference = P.decode_attention_reference(q[:3], kv[1, 0], kv[1, 1], tables, lens)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out[:3].float(), reference.float(), atol=tol, rtol=tol)
    assert out.shape == q.shape and (out[3] == 0).all()
    before = kv.clone()
    with pytest.raises(RuntimeError, match="slot out of range"):       # the first row's slot is fine: nothing written
        torch.ops.nano_vllm_cpu.paged_decode_step(q[:2], k[:2], v[:2], kv, 1, torch.tensor([slots[0], num_blocks * bs]),
                                                  tables[:2], lens[:2])
    assert torch.equal(kv, before)


# ----------------------------------------------------------------------------- prompt attention (paged_prefill.cpp)


@pytest.fixture
def prompt_kernel():
    """The extension, holding causal_attention: on a CPU with AVX512-BF16 and a compiler, it must."""
    if not M.cpu_has_bf16():
        pytest.skip("this CPU has no AVX512-BF16: the bf16 prompt kernel is built only for CPUs with it")
    ext = built_cpu_extension()
    assert hasattr(ext, "causal_attention"), "a CPU with AVX512-BF16: the extension must hold the prompt kernel"
    return ext


@pytest.fixture
def counted_prompt_kernel(prompt_kernel, monkeypatch):
    """nano_kernels/attention.py's extension with causal_attention noting the rows of each call (and
    computing what the kernel computes). Returns the list of rows."""
    calls = []
    counting = SimpleNamespace(
        causal_attention=lambda q, k, v: calls.append(q.shape[0]) or prompt_kernel.causal_attention(q, k, v))
    monkeypatch.setattr(A, "cpu_extension", lambda: counting)
    return calls


def chunk_reference(q, k, v):
    """q (m, H, d) the LAST m positions of k/v (n, n_kv, d), in float64: (m, H, d)."""
    m, n, g = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    mask = torch.arange(n)[None, :] <= torch.arange(n - m, n)[:, None]                  # (m, n)
    k, v = (x.double().repeat_interleave(g, 1).transpose(0, 1) for x in (k, v))             # (H, n, d)
    return F.scaled_dot_product_attention(q.double().transpose(0, 1), k, v, attn_mask=mask).transpose(0, 1)


@pytest.mark.parametrize("H,n_kv,d", [(16, 8, 128), (32, 8, 128), (8, 8, 64), (4, 1, 64)])
@pytest.mark.parametrize("m,n", [(1, 50), (3, 3), (32, 32), (33, 33), (100, 100), (300, 300), (40, 200), (65, 1000)])
def test_prefill_kernel_is_as_close_to_exact_attention_as_sdpa(prompt_kernel, H, n_kv, d, m, n):
    """bf16 causal attention of a chunk after n - m earlier positions, against float64: the kernel's
    error is SDPA's (both round the probabilities and the output to bf16), on peaked scores where a
    key read past a row's position, a wrong row or a lost rescale would show. Inputs are strided
    views, as the engine passes them."""
    g = torch.Generator().manual_seed(m * n + H)
    q = (4 * torch.randn(m, H + 2, d, generator=g)).bfloat16()[:, 1:H + 1]           # rows not contiguous
    k, v = (torch.randn(n_kv, n, d, generator=g).bfloat16().transpose(0, 1) for _ in range(2))   # head-major
    out = prompt_kernel.causal_attention(q, k, v)
    assert out.shape == (m, H, d) and out.dtype == torch.bfloat16
    ref = chunk_reference(q, k, v)
    mask = torch.arange(n)[None, :] <= torch.arange(n - m, n)[:, None]
    sdpa = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                          attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)
    err, sdpa_err = (out.double() - ref).abs().max().item(), (sdpa.double() - ref).abs().max().item()
    assert err <= 1.25 * sdpa_err + 1e-3, (err, sdpa_err)


def test_prefill_kernel_rejects_what_it_was_not_written_for(prompt_kernel):
    q, k = torch.randn(40, 4, 64).bfloat16(), torch.randn(40, 2, 64).bfloat16()
    for args in ((q.float(), k.float(), k.float()), (q[:, :, :32], k[:, :, :32], k[:, :, :32]), (q, k[:30], k[:30])):
        with pytest.raises(RuntimeError, match="causal_attention"):
            prompt_kernel.causal_attention(*args)


def test_paged_prefill_takes_the_kernel_for_long_chunks(counted_prompt_kernel):
    """Through the block tables, NaN in every other slot: fresh prompts (their own k/v) and chunks
    after a cached prefix (gathered) give the dense answer; a chunk under PREFILL_MIN_ROWS goes to
    SDPA. The kernel is seen to run."""
    calls = counted_prompt_kernel
    assert 5 < A.PREFILL_MIN_ROWS <= 40                                   # the 5-row chunk is short, the rest long
    backend = A.CPUAttention(decode=False, prefill=True)
    lens, q_lens = [200, 64, 90, 45], [40, 64, 90, 5]
    seqs, kc, vc, bt, ctx = paged_layout(lens, q_lens, 16, 8, 128, 16, dtype=torch.bfloat16, seed=9)
    q = torch.cat([s[0][-m:] for s, m in zip(seqs, q_lens)])
    gathered = P.paged_prefill_attention(q, kc, vc, torch.tensor([0] + q_lens).cumsum(0), ctx, bt, backend=backend)
    assert sorted(calls) == [40, 64, 90]
    plan = P.step_plan(bt, ctx, torch.tensor(q_lens), 16, 8, step_kv=True)    # as in a step: own k/v at hand
    assert [seq.own for seq in plan.seqs] == [False, True, True, False]
    k, v = (torch.cat([s[i][-m:] for s, m in zip(seqs, q_lens)]) for i in (1, 2))
    own = P.attend_per_sequence(q, k, v, kc, vc, plan, backend)
    assert sorted(calls) == [40, 40, 64, 64, 90, 90]
    ref = torch.cat([dense_reference(*s[:3])[-m:] for s, m in zip(seqs, q_lens)])
    for out in (gathered, own):
        torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


@torch.inference_mode()
def test_bf16_model_with_the_prompt_kernel_is_as_close_to_fp32_as_with_sdpa(counted_prompt_kernel):
    """Qwen3's head size (128) in bf16 through PagedContext: a 70-token prompt, then a 40-token
    chunk after it (its keys gathered from the pool). bf16 rounding depends on the kernel, so the
    check is against the fp32 model: with the prompt kernel the logits are as close to it as with
    SDPA (on average, within 25%) and give its top-1 token as often (give or take one position)."""
    calls = counted_prompt_kernel
    cfg = M.ModelConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=128)
    exact = M.Qwen3ForCausalLM(cfg)
    exact.load_state_dict(M.random_state_dict(cfg, 3), strict=False)
    exact.lm_head.weight = exact.model.embed_tokens.weight
    model = copy.deepcopy(exact).to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (110,), generator=torch.Generator().manual_seed(3))
    reference = exact.eval().compute_logits(exact(ids, torch.arange(110))).float()

    def logits(backend):
        bm = P.BlockManager(num_blocks=8, block_size=16, enable_prefix_caching=False)
        kv = P.allocate_kv_cache(cfg, 8, 16, torch.bfloat16, "cpu")
        bm.allocate(0, ids.tolist(), num_new_tokens=70)
        first = model(ids[:70], torch.arange(70), P.PagedContext.from_spans(kv, bm, [(0, 0, 70)], backend=backend))
        bm.append_slots(0, 40)
        second = model(ids[70:], torch.arange(70, 110),
                       P.PagedContext.from_spans(kv, bm, [(0, 70, 110)], backend=backend))
        return model.compute_logits(torch.cat([first, second])).float()

    with_kernel = logits(A.CPUAttention(decode=False, prefill=True))
    assert calls == [70, 70, 40, 40]                                  # both layers, both chunks
    with_sdpa = logits(P.TORCH_SDPA)
    assert calls == [70, 70, 40, 40]
    assert (with_kernel - reference).abs().mean() <= 1.25 * (with_sdpa - reference).abs().mean()
    top1 = reference.argmax(-1)
    assert (with_kernel.argmax(-1) == top1).sum() >= (with_sdpa.argmax(-1) == top1).sum() - 1


# ----------------------------------------------------------------------------- linear layers (gemv.cpp, swaps)


@NEEDS_COMPILER
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [64, 100, 128, 256, 1024, 1024 + 16 + 3])   # whole blocks only (fp32: 128 on; bf16: 256 on), single registers, a scalar tail
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_gemv_kernel_matches_the_fp32_product(dtype, K, rows):
    """x @ W^T summed in fp32 whatever the dtype, rounded once to it: fp32 to ~1e-6, bf16 to
    within one rounding of the exact product's."""
    ext = built_cpu_extension()
    torch.manual_seed(K + rows)
    x, w = torch.randn(2 * rows, K, dtype=dtype)[::2], torch.randn(300, K, dtype=dtype)   # x not contiguous
    exact = x.double() @ w.double().T                                                      # (rows, 300)
    x_columns = x.T.contiguous().T                                                         # x's columns contiguous
    for out in (ext.gemv(x, w), torch.ops.nano_vllm_cpu.gemv(x, w), ext.gemv(x_columns, w)):
        assert out.shape == (rows, 300) and out.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(out.double(), exact, atol=1e-4, rtol=1e-5)
        else:
            ulp = exact.abs().to(dtype).double() * 2 ** -7                                 # one bf16 step there
            assert ((out.double() - exact).abs() <= ulp + 1e-3).all()


@NEEDS_COMPILER
def test_gemv_kernel_rejects_what_it_was_not_written_for():
    ext = built_cpu_extension()
    with pytest.raises(RuntimeError, match="gemv"):
        ext.gemv(torch.randn(1, 64), torch.randn(8, 32))                         # K differs
    with pytest.raises(RuntimeError, match="gemv"):
        ext.gemv(torch.randn(1, 64), torch.randn(8, 64, dtype=torch.bfloat16))   # dtypes differ
    with pytest.raises(RuntimeError, match="gemv"):
        ext.gemv(torch.randn(1, 64, dtype=torch.float16), torch.randn(8, 64, dtype=torch.float16))


@NEEDS_COMPILER
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_linear_takes_small_batches_and_hands_larger_ones_on(dtype):
    """Up to max_rows rows the kernel, beyond them the batched module; the same numbers either
    way, and the weight is the nn.Linear's own Parameter."""
    built_cpu_extension()
    torch.manual_seed(0)

    class Counting(torch.nn.Module):             # nn.Linear, noting the rows it is given
        def __init__(self, lin):
            super().__init__()
            self.lin, self.rows = lin, []

        def forward(self, x):
            self.rows.append(x.shape[0])
            return self.lin(x)
    lin = torch.nn.Linear(256, 384, bias=False).to(dtype)
    gl = GEMVLinear(Counting(lin), lin.weight, max_rows=2)
    assert gl.weight is lin.weight
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    with torch.inference_mode():
        for rows in (1, 2, 3, 16):
            x = torch.randn(rows, 256, dtype=dtype)
            torch.testing.assert_close(gl(x).float(), lin(x).float(), atol=tol, rtol=tol)
    assert gl.batched.rows == [3, 16]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
def test_onednn_linear_matches_nn_linear(dtype, tol):
    """oneDNN's matmul on the nn.Linear's own weight (the same Parameter: no packed copy)."""
    if dtype == torch.bfloat16 and not M.cpu_has_bf16():
        pytest.skip("this CPU has no bf16 units (AVX512-BF16 or AMX): oneDNN would emulate bf16")
    torch.manual_seed(0)
    for rows in (1, 5, 64):
        lin = torch.nn.Linear(256, 384, bias=False).to(dtype)
        x = torch.randn(rows, 256, dtype=dtype)
        onednn = OneDNNLinear(lin)
        assert onednn.weight is lin.weight and dict(onednn.named_parameters()) == {"weight": lin.weight}
        torch.testing.assert_close(onednn(x).float(), lin(x).float(), atol=tol, rtol=tol)


def test_small_batch_fp32_linear_matches_nn_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 384, bias=False)
    assert SmallBatchLinear(lin).weight is lin.weight
    for rows in (1, 3, 4, 16, 32, 33, 64):        # both sides of each switch-over
        x = torch.randn(rows, 256)
        out = SmallBatchLinear(lin)(x)
        assert out.is_contiguous() and out.shape == (rows, 384)
        torch.testing.assert_close(out, lin(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("vendor, kind", [("GenuineIntel", SmallBatchLinear), ("AuthenticAMD", OneDNNLinear)])
def test_linear_swaps_keep_names_ties_and_the_model_s_logits(vendor, kind, monkeypatch):
    """fp32: every nn.Linear becomes (a GEMVLinear around) the batched module of this CPU, under
    the same name, holding the same Parameter (the tied lm_head still is the embedding); the
    logits of a prompt (batched rows) and of one row (the GEMV) stay within rounding of nn.Linear's."""
    if kind is OneDNNLinear and not torch.backends.mkldnn.is_available():
        pytest.skip("needs oneDNN")
    monkeypatch.setattr(nano_kernels.linear, "cpu_vendor", lambda: vendor)
    cfg = M.PRESETS["tiny"]
    plain = M.Qwen3ForCausalLM(cfg)
    plain.load_state_dict(M.random_state_dict(cfg, 0), strict=False)
    plain.lm_head.weight = plain.model.embed_tokens.weight
    plain.eval()
    model = copy.deepcopy(plain)
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    used = use_cpu_linear_kernels(model, torch.float32, M.cpu_has_bf16())
    assert used == ("GEMVLinear + " if HAS_COMPILER else "") + kind.__name__
    swapped = dict(model.named_modules())
    for name in names:
        module = swapped[name]
        batched = module.batched if isinstance(module, GEMVLinear) else module
        assert isinstance(module, GEMVLinear) == HAS_COMPILER and isinstance(batched, kind), name
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in plain.named_parameters()}
    with torch.inference_mode():
        for ids in (torch.arange(1, 34) * 97, torch.tensor([5])):
            torch.testing.assert_close(model.compute_logits(model(ids, torch.arange(len(ids)))),
                                       plain.compute_logits(plain(ids, torch.arange(len(ids)))), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- the norms (rms_norm.cpp)


@NEEDS_COMPILER
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1024), (3, 16, 128), (64, 1024)])     # the last: past MAX_NUMEL, 02's code
def test_fused_rms_norm_equals_02s(dtype, shape):
    """The eager CPU engine's RMSNorm: in bf16 bit for bit 02's (the same two roundings), in fp32
    within a few ulps (another order of summation)."""
    ext = built_cpu_extension()
    torch.manual_seed(len(shape))
    norm = M.RMSNorm(shape[-1], 1e-6)
    norm.weight.data = torch.randn(shape[-1])
    norm = norm.to(dtype)
    fused = FusedRMSNorm(norm)
    assert fused.weight is norm.weight
    x = 3 * torch.randn(*shape, dtype=dtype)
    if dtype == torch.bfloat16:
        assert torch.equal(fused(x), norm(x))
    else:
        torch.testing.assert_close(fused(x), norm(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="rms_norm"):
        ext.rms_norm(x, norm.weight[:-1], 1e-6)


def _qk_cos_sin(cfg, tokens: int, dtype):
    g = torch.Generator().manual_seed(tokens)
    q = 3 * torch.randn(tokens, cfg.num_attention_heads, cfg.head_dim, generator=g)
    k = 3 * torch.randn(tokens, cfg.num_key_value_heads, cfg.head_dim, generator=g)
    cos, sin = M.rope_cos_sin(torch.randint(0, 40000, (tokens,), generator=g), cfg.head_dim, cfg.rope_theta, dtype)
    return q.to(dtype), k.to(dtype), cos, sin


@NEEDS_COMPILER
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 2, 16, 300])                           # 300: a prompt, rows over threads
def test_fused_norm_and_rotate_equals_the_norm_kernel_and_02s_rope(dtype, tokens):
    """One C++ call for q_norm, k_norm and RoPE gives bit for bit the engine's RMSNorm kernel
    followed by 02's apply_rope (the same roundings, no fused multiply-add), and within rounding
    what 02's modules give."""
    ext = built_cpu_extension()
    cfg = M.PRESETS["demo"]
    torch.manual_seed(tokens)
    attn = M.Qwen3Attention(cfg, 0)
    attn.q_norm.weight.data, attn.k_norm.weight.data = torch.randn(cfg.head_dim), torch.randn(cfg.head_dim)
    attn = attn.to(dtype)
    fused = FusedNormRoPEAttention(attn)
    assert fused.q_proj is attn.q_proj and fused.k_norm is attn.k_norm and fused.layer_idx == 0
    q, k, cos, sin = _qk_cos_sin(cfg, tokens, dtype)
    eps = attn.q_norm.eps
    one_by_one = (M.apply_rope(ext.rms_norm(q, attn.q_norm.weight, eps), cos, sin),
                  M.apply_rope(ext.rms_norm(k, attn.k_norm.weight, eps), cos, sin))
    plain = M.Qwen3Attention.norm_and_rotate(attn, q, k, cos, sin)
    for got, want, close in zip(fused.norm_and_rotate(q, k, cos, sin), one_by_one, plain):
        assert torch.equal(got, want)
        torch.testing.assert_close(got, close, atol=0.05 if dtype == torch.bfloat16 else 1e-5, rtol=0.02)


@NEEDS_COMPILER
def test_fused_norm_and_rotate_leaves_hooked_norms_to_02():
    """The x-ray hooks q_norm and k_norm: then they must run (02's path), not the fused call."""
    built_cpu_extension()
    cfg = M.PRESETS["tiny"]
    fused = FusedNormRoPEAttention(M.Qwen3Attention(cfg, 0))
    seen = []
    fused.q_norm.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    q, k, cos, sin = _qk_cos_sin(cfg, 1, torch.float32)
    fused.norm_and_rotate(q, k, cos, sin)
    assert seen == [q.shape]


# ----------------------------------------------------------------------------- memory (huge pages)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return M.make_random_checkpoint(str(tmp_path_factory.mktemp("kernels") / "tiny"), "tiny", seed=7, dtype="float32")


def logits_of(model, ids):
    with torch.inference_mode():
        return model.compute_logits(model(ids, torch.arange(len(ids))))


def storage_start(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_huge_page_zeros_are_zeroed_writable_and_aligned():
    pool = huge_page_zeros((3, 5, 7), torch.bfloat16)
    assert pool.shape == (3, 5, 7) and pool.dtype == torch.bfloat16 and not pool.any()
    pool[1, 2, 3] = 4.0
    assert pool.sum().item() == 4.0
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert pool.data_ptr() % HUGE_PAGE == 0 and pool.storage_offset() == 0    # the storage starts there
        assert storage_start(pool) == pool.data_ptr()


def test_shared_huge_page_allocator_puts_every_weight_in_one_buffer(tiny_checkpoint):
    """shared=True (the eager engine): every weight in one huge-page buffer, each 64-byte aligned,
    none overlapping; loaded through it, the model is the plain load's (tied lm_head still the
    embedding), the same logits bit for bit."""
    plain = M.load_model(tiny_checkpoint, torch.float32)
    model = M.load_model(tiny_checkpoint, torch.float32, allocate=huge_page_allocator(shared=True))
    params = dict(model.named_parameters())
    assert params.keys() == dict(plain.named_parameters()).keys()
    for name, p in plain.named_parameters():
        assert torch.equal(params[name], p), name
    assert model.lm_head.weight is model.model.embed_tokens.weight
    start = storage_start(model.model.embed_tokens.weight)
    assert all(storage_start(p) == start for p in params.values())                      # one buffer
    assert all(p.data_ptr() % 64 == 0 for p in params.values())
    spans = sorted((p.data_ptr(), p.data_ptr() + p.nbytes) for p in params.values())
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))   # no overlap
    buffer_bytes = model.model.embed_tokens.weight.untyped_storage().nbytes()
    assert buffer_bytes >= sum(p.nbytes for p in params.values())
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert start % HUGE_PAGE == 0
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6] * 5)
    assert torch.equal(logits_of(model, ids), logits_of(plain, ids))


def test_unshared_huge_page_allocator_gives_each_big_matrix_its_own_buffer(tiny_checkpoint):
    """shared=False (--compile: freezing takes weights sharing one storage for one constant): each
    tensor of 2 MiB or more in a huge-page buffer of its own, starting at its storage's start; the
    rest in ordinary memory. The same model, the same logits."""
    shapes = {"big": torch.Size([1024, 512]), "small": torch.Size([64, 64]), "bigger": torch.Size([3, 1024, 700])}
    out = huge_page_allocator(shared=False)(shapes, torch.float32)
    assert {n: t.shape for n, t in out.items()} == shapes and all(t.dtype == torch.float32 for t in out.values())
    for name in ("big", "bigger"):
        t = out[name]
        assert t.nbytes >= HUGE_PAGE and t.storage_offset() == 0 and not t.any()
        if hasattr(mmap, "MADV_HUGEPAGE"):
            assert t.data_ptr() % HUGE_PAGE == 0
    assert len({storage_start(t) for t in out.values()}) == 3                          # three buffers
    plain = M.load_model(tiny_checkpoint, torch.float32)
    model = M.load_model(tiny_checkpoint, torch.float32, allocate=huge_page_allocator(shared=False))
    big = [n for n, p in model.named_parameters() if p.nbytes >= HUGE_PAGE]
    assert big == ["model.embed_tokens.weight"]                                         # tiny: only the embedding
    emb = model.model.embed_tokens.weight
    assert model.lm_head.weight is emb and emb.storage_offset() == 0
    assert all(storage_start(p) != storage_start(emb) for n, p in model.named_parameters() if n not in big)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert emb.data_ptr() % HUGE_PAGE == 0
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6] * 5)
    assert torch.equal(logits_of(model, ids), logits_of(plain, ids))


def test_weight_allocator_is_huge_pages_on_a_cpu_only():
    for device in ("cuda", "meta"):
        assert nano_kernels.weight_allocator(torch.device(device)) is None
    shapes = {"a": torch.Size([600, 1024]), "b": torch.Size([8])}
    shared = nano_kernels.weight_allocator(torch.device("cpu"))(shapes, torch.float32)
    assert storage_start(shared["a"]) == storage_start(shared["b"])
    own = nano_kernels.weight_allocator(torch.device("cpu"), compile=True)(shapes, torch.float32)
    assert storage_start(own["a"]) != storage_start(own["b"]) and own["a"].storage_offset() == 0

using KernelLM.Models.Llama;
using KernelLM.Runtime;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Driver;
using KernelLM.Runtime.Cuda.Emulator;
using KernelLM.Runtime.Cuda.Ops;
using KernelLM.Runtime.KvSelect;
using KernelLM.Tests.Cuda;
using KernelLM.Tests.Fixtures;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.KvSelect;

/// <summary>
/// TokenSelect in whole models on the CUDA path (the emulated device executes the real kernels; the real GPU when one
/// exists): the CPU and device sessions select alike through prefill chunks (mean query) and decode steps, with the
/// cache off and on (same counts), with the decode step captured as CUDA graphs (selection inside) and without; a device decode step with selection allocates nothing; the list the kernels write
/// for a context too short to select, launched with a capacity-sized bound as a captured decode step would, gives
/// full attention.
/// </summary>
[TestFixture("cuda-emulated")]
[TestFixture("cuda")]
public sealed class KvSelectDeviceTests(string deviceName)
{
    private CudaDevice _device = null!;
    private string _directory = "";

    [OneTimeSetUp]
    public void CreateDevice()
    {
        if (deviceName == "cuda")
        {
            CudaTestSupport.RequireDevice();
        }
        _device = new CudaDevice(deviceName == "cuda" ? new DriverBackend() : new EmulatorBackend());
    }

    [OneTimeTearDown]
    public void DisposeDevice() => _device?.Dispose();

    [SetUp]
    public void CreateDirectory() => _directory = TestPaths.NewTemporaryDirectory("kv-select");

    [TearDown]
    public void DeleteDirectory() => Directory.Delete(_directory, recursive: true);

    [TestCase(1f, true, KvSelectPositions.Standard)]
    [TestCase(0.3f, true, KvSelectPositions.Standard)]
    [TestCase(0.3f, false, KvSelectPositions.Standard)]
    [TestCase(1f, true, KvSelectPositions.Compacted)]
    [TestCase(0.3f, true, KvSelectPositions.Compacted)]
    [TestCase(1f, false, KvSelectPositions.Compacted)]
    public void Cpu_and_device_sessions_select_alike(float cacheThreshold, bool cudaGraphs, KvSelectPositions positions)
    {
        // An fp32 model: both sides differ only in summation order, so the votes agree to a few ulp and so do the lists.
        // Compacted: both score unrotated queries and keys and rotate inside attention by the slots of the list (the CPU
        // from the RoPE tables, the kernels with sincosf), so the lists agree and the logits to rounding.
        SyntheticModel.Write(_directory, new SyntheticModelSpec { DType = DType.F32, Seed = 21 });
        var select = new KvSelectOptions { TopK = 8, Initial = 2, Local = 4, CacheThreshold = cacheThreshold, Chunk = 16, Positions = positions };
        using var model = LlamaModel.Load(_directory, new ModelLoadOptions { Threads = 2, ContextLength = 96, KvSelect = select });
        using var cpu = model.CreateSession();
        using var uploaded = CudaLlamaModel.Upload(model, _device);
        using var cuda = uploaded.CreateSession(cudaGraphs: cudaGraphs);
        int vocabulary = model.Config.VocabularySize;
        // 40 prompt tokens: chunks at 0 (too short to select), 16 and 32 (select with the chunk's mean query).
        int[] prompt = Enumerable.Range(0, 40).Select(i => (i * 37 + 11) % vocabulary).ToArray();
        var expected = new float[vocabulary];
        var actual = new float[vocabulary];
        cpu.Forward(prompt, expected);
        cuda.Forward(prompt, actual);
        double worst = Compare(expected, actual, "prefill");
        for (int step = 0; step < 12; step++)
        {
            int token = System.Numerics.Tensors.TensorPrimitives.IndexOfMax(expected);
            cpu.Forward([token], expected);
            cuda.Forward([token], actual);
            worst = Math.Max(worst, Compare(expected, actual, $"decode step {step}"));
        }
        var cpuCounts = cpu.KvSelectStatistics!.Value;
        var cudaCounts = cuda.KvSelectStatistics!.Value;
        TestContext.Out.WriteLine($"{positions}, cache {cacheThreshold}: max |cpu - cuda| = {worst:E3}; cpu {cpuCounts}; cuda {cudaCounts}");
        Assert.That((cudaCounts.Selections, cudaCounts.CacheHits), Is.EqualTo((cpuCounts.Selections, cpuCounts.CacheHits)), "same selections and hits");
        Assert.That(cpuCounts.Selections, Is.GreaterThan(0));
        Assert.That(cuda.CapturedGraphs, cudaGraphs ? Is.GreaterThan(0) : Is.Zero, "the decode steps (selection included) ran as captured graphs");
        if (cacheThreshold < 1f)
        {
            Assert.That(cpuCounts.CacheHits, Is.GreaterThan(0), "a low threshold hits");
        }
    }

    /// <summary>A rollback (Truncate) forgets the cached selections: with a cache that always hits, the cached list of the
    /// last prefill chunk names positions past the shortened context's local window; reusing it would break the list's
    /// order (the CPU refuses such a list). After the rollback both devices select anew and still agree.</summary>
    [Test]
    public void A_rollback_forgets_the_cached_selections()
    {
        SyntheticModel.Write(_directory, new SyntheticModelSpec { DType = DType.F32, Seed = 22 });
        var select = new KvSelectOptions { TopK = 8, Initial = 2, Local = 4, CacheThreshold = -1f, Chunk = 16 };
        using var model = LlamaModel.Load(_directory, new ModelLoadOptions { Threads = 2, ContextLength = 96, KvSelect = select });
        using var cpu = model.CreateSession();
        using var uploaded = CudaLlamaModel.Upload(model, _device);
        using var cuda = uploaded.CreateSession();
        int vocabulary = model.Config.VocabularySize;
        int[] prompt = Enumerable.Range(0, 48).Select(i => (i * 53 + 7) % vocabulary).ToArray();
        var expected = new float[vocabulary];
        var actual = new float[vocabulary];
        cpu.Forward(prompt, expected);
        cuda.Forward(prompt, actual);
        for (int step = 0; step < 6; step++)
        {
            cpu.Forward([step + 3], expected);
            cuda.Forward([step + 3], actual);
        }
        var before = cpu.KvSelectStatistics!.Value;
        cpu.Truncate(20);
        cuda.Truncate(20);
        for (int step = 0; step < 6; step++)
        {
            cpu.Forward([step + 100], expected);
            cuda.Forward([step + 100], actual);
            Compare(expected, actual, $"decode step {step} after the rollback");
        }
        var after = cpu.KvSelectStatistics!.Value;
        Assert.That(after.Selections, Is.EqualTo(before.Selections + 2), "the first step after the rollback selects anew in each of the 2 layers");
        Assert.That(cuda.KvSelectStatistics, Is.EqualTo(after), "the device counts the same");
    }

    /// <summary>The key correctness test of compacted positions: while the context is no longer than init + k + local the
    /// list is 0..n-1 (or absent), so every slot is its true position and compacted mode (keys cached before RoPE,
    /// rotated inside attention) must give the logits of standard full attention, through prefill chunks and decode steps
    /// replayed as captured graphs (the selection kernels and the rotation inside them).</summary>
    [TestCase(true)]
    [TestCase(false)]
    public void Compacted_positions_with_a_covering_k_equal_full_attention_on_the_device(bool cudaGraphs)
    {
        SyntheticModel.Write(_directory, new SyntheticModelSpec { DType = DType.F32, Seed = 23 });
        using var model = LlamaModel.Load(_directory, new ModelLoadOptions { Threads = 2, ContextLength = 96 });
        using var uploaded = CudaLlamaModel.Upload(model, _device);
        using var full = uploaded.CreateSession(cudaGraphs: cudaGraphs);
        // init + k + local = 84: never selects over 80 positions, but a decode bound of 96 launches the kernels, which list 0..n-1.
        var covering = new KvSelectOptions { TopK = 64, Initial = 4, Local = 16, Chunk = 16, Positions = KvSelectPositions.Compacted };
        using var compacted = uploaded.CreateSession(cudaGraphs: cudaGraphs, kvSelect: covering);
        int vocabulary = model.Config.VocabularySize;
        int[] prompt = Enumerable.Range(0, 40).Select(i => (i * 29 + 5) % vocabulary).ToArray();
        var expected = new float[vocabulary];
        var actual = new float[vocabulary];
        full.Forward(prompt, expected);
        compacted.Forward(prompt, actual);
        double worst = Compare(expected, actual, "prefill");
        for (int step = 0; step < 40; step++)
        {
            int token = System.Numerics.Tensors.TensorPrimitives.IndexOfMax(expected);
            full.Forward([token], expected);
            compacted.Forward([token], actual);
            worst = Math.Max(worst, Compare(expected, actual, $"decode step {step}"));
        }
        TestContext.Out.WriteLine($"graphs {cudaGraphs}: max |full - compacted| = {worst:E3} over 80 positions");
        Assert.That(compacted.KvSelectStatistics, Is.EqualTo(new KvSelectStatistics(0, 0)), "a covering k never selects");
        Assert.That(compacted.CapturedGraphs, cudaGraphs ? Is.GreaterThan(0) : Is.Zero);
    }

    private static double Compare(float[] expected, float[] actual, string what)
    {
        double tolerance = 2e-5 * (1 + expected.Max(Math.Abs));
        double worst = expected.Select((e, i) => Math.Abs(e - actual[i])).Max();
        Assert.That(worst, Is.LessThanOrEqualTo(tolerance), $"{what}: max |cpu - cuda|");
        return worst;
    }

    [TestCase(KvSelectPositions.Standard)]
    [TestCase(KvSelectPositions.Compacted)]
    public void A_device_decode_step_with_selection_allocates_nothing(KvSelectPositions positions)
    {
        SyntheticModel.Write(_directory, new SyntheticModelSpec { DType = DType.BF16, Seed = 13 });
        var select = new KvSelectOptions { TopK = 8, Initial = 2, Local = 4, CacheThreshold = 0.5f, Positions = positions };
        using var model = LlamaModel.Load(_directory, new ModelLoadOptions { Threads = 1, ContextLength = 256, KvSelect = select });
        using var uploaded = CudaLlamaModel.Upload(model, _device);
        using var session = uploaded.CreateSession();
        var options = new KernelLM.Runtime.Sampling.SamplingOptions { Temperature = 0.8f, TopK = 20, TopP = 0.9f };
        var stats = new float[KernelLM.Runtime.Signals.VocabStats.FieldCount];
        var ids = new int[4];
        var logProbs = new float[4];
        int[] next = [session.ForwardSample(Enumerable.Range(1, 20).ToArray(), options, 3, 4, stats, ids, logProbs)];
        for (int i = 0; i < 20; i++)
        {
            next[0] = session.ForwardSample(next, options, 3, 4, stats, ids, logProbs);
        }
        Thread.Sleep(200);
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < 10; i++)
        {
            next[0] = session.ForwardSample(next, options, 3, 4, stats, ids, logProbs);
        }
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        Assert.That(allocated, Is.Zero, "bytes allocated by 10 device decode steps with selection");
        var counts = session.KvSelectStatistics!.Value;
        Assert.That(counts.Selections + counts.CacheHits, Is.GreaterThan(0));
    }

    /// <summary>A captured decode step launches with the capacity as its bound; a context no longer than init + k + local
    /// then gets the list 0..n-1 from the device, which must give the full-attention output.</summary>
    [Test]
    public void A_short_context_under_a_capacity_bound_lists_every_position()
    {
        const int heads = 8, kvHeads = 2, headDim = 64, capacity = 300, length = 90;
        var select = new KvSelectOptions { TopK = 64, Initial = 8, Local = 32 };
        using var selector = new CudaKvSelector(_device, select, 1, 1, heads, headDim, capacity);
        var random = new Random(4);
        float[] Values(int count) => Enumerable.Range(0, count).Select(_ => (float)(random.NextDouble() * 2 - 1)).ToArray();
        using var keys = _device.Allocate("k_cache", DType.F32, 1, kvHeads, capacity, headDim);
        using var values = _device.Allocate("v_cache", DType.F32, 1, kvHeads, capacity, headDim);
        using var q = _device.Allocate("q", DType.F32, 1, heads, headDim);
        using var lengths = _device.Allocate("lengths", DType.I32, 1);
        using var plain = _device.Allocate("plain", DType.F32, 1, heads, headDim);
        using var listed = _device.Allocate("listed", DType.F32, 1, heads, headDim);
        keys.Upload<float>(Values(capacity * kvHeads * headDim));
        values.Upload<float>(Values(capacity * kvHeads * headDim));
        q.Upload<float>(Values(heads * headDim));
        lengths.Upload<int>([length]);

        var hook = selector.Select(0, q, keys, lengths, capacity, useCache: true);
        Assert.That(hook.Indices, Is.Not.Null, "a capacity bound above init + k + local launches the selection");
        CudaOps.AttentionDecode(_device, q, keys, values, lengths, length, 0, null, plain, splits: 1);
        CudaOps.AttentionDecode(_device, q, keys, values, lengths, length, 0, null, listed, hook, splits: 1);

        Assert.That(selector.Layer(0).IndexCounts.Download<int>(), Is.EqualTo(new[] { length }));
        Assert.That(selector.Layer(0).Indices.Download<int>()[..length], Is.EqualTo(Enumerable.Range(0, length).ToArray()));
        Assert.That(listed.Download<float>(), Is.EqualTo(plain.Download<float>()), "the full list is full attention");
        Assert.That(selector.Statistics(), Is.EqualTo(new KvSelectStatistics(0, 0)), "nothing selected, nothing hit");
    }
}

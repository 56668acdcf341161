using System.Globalization;
using System.Text.RegularExpressions;
using KernelLM.Runtime;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Emulator;
using KernelLM.Runtime.Cuda.Ops;
using KernelLM.Runtime.Signals;
using KernelLM.Tests.Conformance;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Cuda;

/// <summary>
/// What the conformance suite does not reach through <see cref="OpBackend"/>: the launch layout, the kernel's constants
/// against the launcher's, rows that are long enough to loop over their slice, a reference row aligned unlike the
/// logits (the scalar path), token ids outside the vocabulary, and the op entry's argument checks. On the emulated device.
/// </summary>
[TestFixture]
public sealed class VocabStatsOpTests
{
    private CudaDevice _device = null!;

    [OneTimeSetUp]
    public void CreateDevice() => _device = new CudaDevice(new EmulatorBackend(), [KernelSources.Get("vocab_stats.cu")]);

    [OneTimeTearDown]
    public void DisposeDevice() => _device.Dispose();

    [TearDown]
    public void EveryAllocationFreed() => Assert.That(((EmulatorBackend)_device.Backend).LiveAllocations, Is.Zero, "device allocations leaked by the test");

    /// <summary>The guard regions of these tests and of the conformance suite put outputs in views of larger buffers.</summary>
    [Test]
    public void A_view_frees_nothing_and_must_fit_inside_its_tensor()
    {
        using var buffer = _device.Allocate("buffer", DType.F32, 10);
        var view = buffer.View("tail", DType.I32, 8, 2, 3);
        Assert.That((view.Address, view.ByteLength, view.ShapeText), Is.EqualTo((buffer.Address + 8, 24L, "[2, 3]")));
        view.Dispose();
        Assert.That(((EmulatorBackend)_device.Backend).LiveAllocations, Is.EqualTo(1), "disposing a view leaves its parent allocated");
        Assert.That(() => buffer.View("too_long", DType.F32, 4, 10), Throws.ArgumentException.With.Message.Contains("view 'too_long'").And.Message.Contains("tensor 'buffer'"));
        Assert.That(() => buffer.View("odd", DType.F32, 2, 1), Throws.ArgumentException.With.Message.Contains("aligned"));
    }

    [TestCase(1, 128256, 63, 2040)]
    [TestCase(1, 151936, 75, 2032)]
    [TestCase(8, 151936, 75, 2032)]
    [TestCase(1, 1, 1, 8)]
    [TestCase(1, 1000, 1, 1000)]
    [TestCase(3, 32003, 16, 2008)]
    [TestCase(40, 65536, 25, 2624)]       // 40 x 32 slices would pass the 1024-block target: 25 per row
    [TestCase(1000, 128256, 1, 128256)]   // one block per row from 1024 rows on (1000 rows: 1024 / 1000 = 1)
    [TestCase(1, 600_001, 128, 4688)]     // at most 128 slices: longer ones
    public void Launch_layout_follows_the_row_length_and_the_row_count(int rows, int vocabulary, int splits, int slice)
    {
        var layout = CudaOps.VocabStatsLaunch(rows, vocabulary);
        Assert.That((layout.Splits, layout.SliceLength), Is.EqualTo((splits, slice)));
        Assert.That((long)layout.Splits * layout.SliceLength, Is.GreaterThanOrEqualTo(vocabulary), "the slices cover the row");
        Assert.That((long)(layout.Splits - 1) * layout.SliceLength, Is.LessThan(vocabulary), "no empty slice");
        Assert.That(layout.SliceLength % 8, Is.Zero, "slices keep the row's 16-byte alignment");
        Assert.That(CudaOps.VocabStatsWorkspaceBytes(rows, vocabulary), Is.EqualTo((long)rows * splits * CudaOps.VocabStatsPartialBytes));
    }

    [Test]
    public void The_kernel_constants_match_the_launcher_and_the_twin()
    {
        string text = KernelSources.Get("vocab_stats.cu").Text;
        string Define(string name) => Regex.Match(text, $@"#define {name} (\S+)").Groups[1].Value;
        Assert.That(int.Parse(Define("VOCAB_STATS_TOP_MAX"), CultureInfo.InvariantCulture), Is.EqualTo(VocabStats.MaxTopK));
        Assert.That(int.Parse(Define("VOCAB_STATS_BLOCK"), CultureInfo.InvariantCulture), Is.EqualTo(CudaOps.VocabStatsBlockSize));
        Assert.That(int.Parse(Define("VOCAB_STATS_MERGE_BLOCK"), CultureInfo.InvariantCulture), Is.EqualTo(CudaOps.VocabStatsMergeBlockSize));
        Assert.That(double.Parse(Define("VOCAB_STATS_UNIFORM_FLOOR"), CultureInfo.InvariantCulture), Is.EqualTo(VocabStats.UniformVarianceFloor));
        Assert.That(text, Does.Contain($"static_assert(sizeof(VocabStatsPartial) == {CudaOps.VocabStatsPartialBytes},"));
        Assert.That(text, Does.Contain($"__launch_bounds__({CudaOps.VocabStatsBlockSize}) void vocab_stats_f32")
            .And.Contain($"__launch_bounds__({CudaOps.VocabStatsBlockSize}) void vocab_stats_bf16")
            .And.Contain($"__launch_bounds__({CudaOps.VocabStatsMergeBlockSize}) void vocab_stats_merge"));
    }

    /// <summary>600001 entries: 128 slices of 4688, so every thread loops over its slice (f32: 3 rounds of two loads).</summary>
    [TestCase(DType.F32)]
    [TestCase(DType.BF16)]
    public void Long_rows_loop_over_their_slice(DType dtype)
    {
        const int vocabulary = 600_001;
        var logits = OpBackend.Representable(dtype, VocabStatsCheck.Row("random", vocabulary, 5));
        var reference = OpBackend.Representable(dtype, VocabStatsCheck.Row("masked", vocabulary, 6));
        int[] tokens = [599_999];
        var (stats, ids, logProbs) = Run(dtype, logits, vocabulary, tokens, reference, referenceOffsetBytes: 0, topK: 16);
        VocabStatsCheck.AssertRow($"vocab_stats({dtype}, vocab={vocabulary})", logits, tokens[0], reference, 16, stats, ids, logProbs,
            CudaOps.VocabStatsLaunch(1, vocabulary).SumLength(dtype));
    }

    /// <summary>A reference row 4 (f32) or 2 (bf16) bytes off the logits' alignment: no 128-bit loads, every entry scalar.</summary>
    [TestCase(DType.F32)]
    [TestCase(DType.BF16)]
    public void A_reference_aligned_unlike_the_logits_is_read_with_scalar_loads(DType dtype)
    {
        const int vocabulary = 5003;
        const int rows = 2;
        var logits = OpBackend.Representable(dtype, [.. VocabStatsCheck.Row("ties", vocabulary, 1), .. VocabStatsCheck.Row("random", vocabulary, 2)]);
        var reference = OpBackend.Representable(dtype, [.. VocabStatsCheck.Row("random", vocabulary, 3), .. VocabStatsCheck.Row("masked", vocabulary, 4)]);
        int[] tokens = [17, 4999];
        var (stats, ids, logProbs) = Run(dtype, logits, vocabulary, tokens, reference, referenceOffsetBytes: dtype.SizeOf(), topK: 4);
        int sumLength = CudaOps.VocabStatsLaunch(rows, vocabulary).SumLength(dtype);
        for (int r = 0; r < rows; r++)
        {
            VocabStatsCheck.AssertRow($"vocab_stats({dtype}, row {r}, misaligned reference)", logits.AsSpan(r * vocabulary, vocabulary), tokens[r],
                reference.AsSpan(r * vocabulary, vocabulary), 4, stats.AsSpan(r * VocabStats.FieldCount, VocabStats.FieldCount),
                ids.AsSpan(r * 4, 4), logProbs.AsSpan(r * 4, 4), sumLength);
        }
    }

    [Test]
    public void Token_ids_past_the_vocabulary_give_NaN_token_fields_and_negative_ids_mean_no_token()
    {
        const int vocabulary = 3000;
        var logits = VocabStatsCheck.Row("random", vocabulary * 3, 8);
        var reference = VocabStatsCheck.Row("random", vocabulary * 3, 9);
        var (stats, _, _) = Run(DType.F32, logits, vocabulary, [vocabulary, -5, 2999], reference, referenceOffsetBytes: 0, topK: 0);
        int fields = VocabStats.FieldCount;
        Assert.That(stats[(int)VocabStatsField.TokenLogProb], Is.NaN);
        Assert.That(stats[(int)VocabStatsField.TokenLogRatio], Is.NaN);
        Assert.That(stats[(int)VocabStatsField.LogSumExp], Is.Not.NaN, "the other fields are unaffected");
        Assert.That(stats[fields + (int)VocabStatsField.TokenLogProb], Is.NaN);
        Assert.That(stats[fields + (int)VocabStatsField.KlPq], Is.Not.NaN);
        Assert.That(stats[2 * fields + (int)VocabStatsField.TokenLogProb], Is.Not.NaN.And.LessThan(0));
    }

    [Test]
    public void Bad_arguments_name_the_tensor()
    {
        using var logits = _device.Allocate("logits", DType.F32, 2, 100);
        using var halfLogits = _device.Allocate("half_logits", DType.F16, 2, 100);
        using var bf16Reference = _device.Allocate("bf16_reference", DType.BF16, 2, 100);
        using var tokens = _device.Allocate("tokens", DType.I32, 3);
        using var workspace = _device.Allocate("workspace", DType.I32, 4);
        using var bigWorkspace = _device.Allocate("big_workspace", DType.I32, 1024);
        using var stats = _device.Allocate("stats", DType.F32, 2, VocabStats.FieldCount);
        using var wrongStats = _device.Allocate("wrong_stats", DType.F32, 2, 8);
        using var ids = _device.Allocate("ids", DType.I32, 2, 4);
        using var logProbs = _device.Allocate("log_probs", DType.F32, 2, 4);
        Assert.That(() => CudaOps.VocabStats(_device, halfLogits, 100, null, null, 0, bigWorkspace, stats, null, null),
            Throws.ArgumentException.With.Message.Contains("'half_logits' is F16"));
        Assert.That(() => CudaOps.VocabStats(_device, logits, 30, null, null, 0, bigWorkspace, stats, null, null),
            Throws.ArgumentException.With.Message.Contains("'logits' [2, 100] is not a whole number of rows of 30"));
        Assert.That(() => CudaOps.VocabStats(_device, logits, 100, tokens, null, 0, bigWorkspace, stats, null, null),
            Throws.ArgumentException.With.Message.Contains("'tokens'"));
        Assert.That(() => CudaOps.VocabStats(_device, logits, 100, null, bf16Reference, 0, bigWorkspace, stats, null, null),
            Throws.ArgumentException.With.Message.Contains("'logits' (F32) and 'bf16_reference' (BF16)"));
        Assert.That(() => CudaOps.VocabStats(_device, logits, 100, null, null, 0, bigWorkspace, wrongStats, null, null),
            Throws.ArgumentException.With.Message.Contains("'wrong_stats'"));
        Assert.That(() => CudaOps.VocabStats(_device, logits, 100, null, null, 17, bigWorkspace, stats, ids, logProbs),
            Throws.InstanceOf<ArgumentOutOfRangeException>().With.Message.Contains("top-k must be in 0..16"));
        Assert.That(() => CudaOps.VocabStats(_device, logits, 100, null, null, 4, bigWorkspace, stats, null, null),
            Throws.ArgumentException.With.Message.Contains("top-4 needs"));
        Assert.That(() => CudaOps.VocabStats(_device, logits, 100, null, null, 3, bigWorkspace, stats, ids, logProbs),
            Throws.ArgumentException.With.Message.Contains("'ids'"));
        Assert.That(() => CudaOps.VocabStats(_device, logits, 100, null, null, 4, workspace, stats, ids, logProbs),
            Throws.ArgumentException.With.Message.Contains("workspace 'workspace' holds 16 bytes; [2, 100] needs 384"));
        Assert.DoesNotThrow(() => CudaOps.VocabStats(_device, logits, 100, null, null, 4, bigWorkspace, stats, ids, logProbs));
    }

    /// <summary>One launch through the op entry; the reference row may sit at a byte offset inside a larger buffer.</summary>
    private (float[] Stats, int[] Ids, float[] LogProbs) Run(DType dtype, float[] logits, int vocabulary, int[] tokens, float[] reference,
        int referenceOffsetBytes, int topK)
    {
        int rows = logits.Length / vocabulary;
        using var logitTensor = _device.Allocate("logits", dtype, rows, vocabulary);
        logitTensor.Upload<byte>(OpBackend.Encode(dtype, logits));
        byte[] referenceBytes = [.. new byte[referenceOffsetBytes], .. OpBackend.Encode(dtype, reference)];
        using var referenceBuffer = _device.Allocate("reference_buffer", DType.I32, (referenceBytes.Length + 3) / 4);
        var padded = new byte[referenceBuffer.ByteLength];
        referenceBytes.CopyTo(padded, 0);
        referenceBuffer.Upload<byte>(padded);
        using var referenceTensor = referenceBuffer.View("reference", dtype, referenceOffsetBytes, rows, vocabulary);
        using var tokenTensor = _device.Allocate("tokens", DType.I32, rows);
        tokenTensor.Upload<int>(tokens);
        using var workspace = _device.Allocate("workspace", DType.I32, checked((int)(CudaOps.VocabStatsWorkspaceBytes(rows, vocabulary) / 4)));
        using var stats = _device.Allocate("stats", DType.F32, rows, VocabStats.FieldCount);
        using var ids = _device.Allocate("top_ids", DType.I32, rows, topK);
        using var logProbs = _device.Allocate("top_log_probs", DType.F32, rows, topK);
        CudaOps.VocabStats(_device, logitTensor, vocabulary, tokenTensor, referenceTensor, topK, workspace, stats, ids, logProbs);
        return (stats.Download<float>(), ids.Download<int>(), logProbs.Download<float>());
    }
}

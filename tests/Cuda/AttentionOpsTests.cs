using KernelLM.Runtime;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Emulator;
using KernelLM.Runtime.Cuda.Ops;

namespace KernelLM.Tests.Cuda;

/// <summary>
/// The attention op entries' checks (each names the tensor at fault), the decode split policy and the tensor
/// views the engine's per-layer caches will use; results are the conformance suite's job.
/// </summary>
[TestFixture]
public sealed class AttentionOpsTests
{
    private CudaDevice _device = null!;

    [OneTimeSetUp]
    public void SetUp() => _device = new CudaDevice(new EmulatorBackend(), [KernelSources.Get("attention.cu")]);

    [OneTimeTearDown]
    public void TearDown() => _device.Dispose();

    [Test]
    public void Op_entries_name_the_tensor_that_is_wrong()
    {
        using var keys = _device.Allocate("k_cache", DType.BF16, 2, 2, 16, 64);
        using var values = _device.Allocate("v_cache", DType.BF16, 2, 2, 16, 64);
        using var q = _device.Allocate("q", DType.BF16, 2, 4, 64);
        using var output = _device.Allocate("out", DType.BF16, 2, 4, 64);
        using var lengths = _device.Allocate("lengths", DType.I32, 2);
        using var wideQ = _device.Allocate("q_f32", DType.F32, 2, 4, 64);
        using var oddHeads = _device.Allocate("q_3_heads", DType.BF16, 2, 3, 64);
        using var oddKeys = _device.Allocate("k_cache_100", DType.BF16, 2, 2, 16, 100);
        using var oddValues = _device.Allocate("v_cache_100", DType.BF16, 2, 2, 16, 100);
        using var bias = _device.Allocate("bias", DType.F32, 2, 4, 15);
        using var indices = _device.Allocate("indices", DType.I32, 2, 5);
        using var workspace = _device.Allocate("workspace", DType.F32, 10);
        using var shortFrequencies = _device.Allocate("inv_freq_31", DType.F32, 31);
        using var halfFrequencies = _device.Allocate("inv_freq_bf16", DType.BF16, 32);
        using var chunk = _device.Allocate("q_chunk", DType.BF16, 2, 3, 4, 64);
        using var chunkOutput = _device.Allocate("out_chunk", DType.BF16, 2, 3, 4, 64);

        void Decode(DeviceTensor query, DeviceTensor k, DeviceTensor v, DeviceAttentionHook hook = default, DeviceTensor? scratch = null, int splits = 1) =>
            CudaOps.AttentionDecode(_device, query, k, v, lengths, 16, 0, scratch, output, hook, splits);

        Assert.That(() => Decode(wideQ, keys, values), Throws.ArgumentException.With.Message.Contains("'q_f32' (F32) and 'k_cache' (BF16)"));
        Assert.That(() => Decode(q, oddKeys, oddValues), Throws.ArgumentException.With.Message.Contains("'k_cache_100' has head_dim 100"));
        Assert.That(() => Decode(oddHeads, keys, values), Throws.ArgumentException.With.Message.Contains("'q_3_heads' has 3 query heads"));
        Assert.That(() => Decode(q, keys, values, new DeviceAttentionHook(KeyBias: bias)), Throws.ArgumentException.With.Message.Contains("'bias' has shape [2, 4, 15]"));
        Assert.That(() => Decode(q, keys, values, new DeviceAttentionHook(Indices: indices)), Throws.ArgumentException.With.Message.Contains("both indices and index counts"));
        Assert.That(() => Decode(q, keys, values, new DeviceAttentionHook(RopeInverseFrequencies: shortFrequencies)),
            Throws.ArgumentException.With.Message.Contains("tensor 'inv_freq_31' has shape [31]; expected [32]"));
        Assert.That(() => Decode(q, keys, values, new DeviceAttentionHook(RopeInverseFrequencies: halfFrequencies)),
            Throws.ArgumentException.With.Message.Contains("inv_freq_bf16"));
        Assert.That(() => CudaOps.AttentionPrefill(_device, chunk, keys, values, lengths, 0, chunkOutput, new DeviceAttentionHook(RopeInverseFrequencies: shortFrequencies)),
            Throws.ArgumentException.With.Message.Contains("'inv_freq_31'"));
        Assert.That(() => Decode(q, keys, values, scratch: workspace, splits: 3), Throws.ArgumentException.With.Message.Contains("workspace 'workspace' [10] F32 must be F32 with at least 1584"));
        Assert.That(() => CudaOps.AttentionPrefill(_device, q, keys, values, lengths, 0, output),
            Throws.ArgumentException.With.Message.Contains("tensor 'q' has shape [2, 4, 64]; expected [2, *, *, 64]"));
    }

    [Test]
    public void Decode_splits_grow_with_the_keys_within_bounds_and_size_the_workspace()
    {
        // The emulated device reports 4 SMs: 8 blocks wanted; one sequence of 8 KV heads already has them.
        Assert.That(CudaOps.AttentionDecodeSplits(_device, batch: 1, heads: 32, kvHeads: 8, headDim: 128, keys: 100_000), Is.EqualTo(1));
        int previous = 1;
        foreach (int keys in new[] { 1, 127, 128, 129, 300, 1000, 4096, 100_000 })
        {
            int splits = CudaOps.AttentionDecodeSplits(_device, batch: 1, heads: 8, kvHeads: 1, headDim: 64, keys);
            Assert.That(splits, Is.InRange(previous, Math.Max(1, (keys + 127) / 128)), $"keys={keys}");
            previous = splits;
        }
        Assert.That(previous, Is.EqualTo(8));
        Assert.That(CudaOps.AttentionDecodeWorkspaceElements(2, 8, 64, 1), Is.Zero, "one split writes the output directly");
        Assert.That(CudaOps.AttentionDecodeWorkspaceElements(2, 8, 64, 3), Is.EqualTo(2 * 8 * 3 * (64 + 2)));
    }

    [Test]
    public void A_view_lies_aligned_inside_its_tensor_and_frees_nothing()
    {
        using var whole = _device.Allocate("caches", DType.BF16, 3, 2, 16, 64);
        long layerBytes = 2 * 16 * 64 * 2;
        var layer = whole.View("layer 1", DType.BF16, layerBytes, 2, 16, 64);
        Assert.That(layer.Address, Is.EqualTo(whole.Address + (ulong)layerBytes));
        layer.Dispose();
        Assert.That(whole.Address, Is.Not.Zero);
        Assert.That(() => whole.View("past the end", DType.BF16, 2 * layerBytes + 16, 2, 16, 64), Throws.ArgumentException.With.Message.Contains("past the end"));
        Assert.That(() => whole.View("unaligned", DType.BF16, 1, 4), Throws.ArgumentException.With.Message.Contains("does not lie aligned"));
    }

    [Test]
    public void Attention_ops_refuse_a_tensor_that_is_not_16_byte_aligned()
    {
        using var buffer = _device.Allocate("k_buffer", DType.BF16, 1 * 3 * 2 * 64 + 8);
        using var values = _device.Allocate("v", DType.BF16, 1, 3, 2, 64);
        using var keyCache = _device.Allocate("k_cache", DType.BF16, 1, 2, 16, 64);
        using var valueCache = _device.Allocate("v_cache", DType.BF16, 1, 2, 16, 64);
        using var starts = _device.Allocate("starts", DType.I32, 1);
        using var frequencies = _device.Allocate("inv_freq", DType.F32, 32);
        var keys = buffer.View("k", DType.BF16, 2, 1, 3, 2, 64);
        Assert.That(() => CudaOps.KvAppend(_device, keys, values, starts, frequencies, keyCache, valueCache),
            Throws.ArgumentException.With.Message.Contains("'k'").And.Message.Contains("16-byte aligned"));
    }
}

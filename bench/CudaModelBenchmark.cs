using BenchmarkDotNet.Attributes;
using KernelLM.Models;
using KernelLM.Models.Llama;
using KernelLM.Runtime;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Driver;
using KernelLM.Runtime.Cuda.Emulator;
using KernelLM.Runtime.Sampling;
using KernelLM.Runtime.Signals;

namespace KernelLM.Bench;

/// <summary>
/// Whole models on the CUDA path with random bf16 weights generated on the device: a greedy decode step at batch 1
/// (sampling on the device; with and without the captured CUDA graph) and the prefill of a 512-token prompt, for the
/// Llama-3.2-1B and Llama-3.1-8B shapes on a GPU. Without a GPU the same code runs a tiny shape on the emulated device
/// (its times say nothing about a GPU; the suite is there so that it stays runnable). Roofline columns: Tokens/s, and
/// GB/s of the weights a decode step reads next to the device's measured copy bandwidth (GPU copy GB/s).
/// </summary>
[MemoryDiagnoser]
public class CudaModelBenchmark : IDisposable
{
    public const int PromptTokens = 512;

    private CudaDevice? _device;
    private CudaLlamaModel? _model;
    private CudaLlamaSession? _session;
    private readonly float[] _stats = new float[VocabStats.FieldCount];
    private readonly int[] _next = [0];
    private int[] _prompt = [];

    /// <summary>The shapes: the real ones on a GPU, "tiny" on the emulated device.</summary>
    public static IEnumerable<string> Shapes => HasGpu ? ["llama-3.2-1b", "llama-3.1-8b"] : ["tiny"];

    [ParamsSource(nameof(Shapes))]
    public string Shape { get; set; } = "tiny";

    [Params(true, false)]
    public bool CudaGraphs { get; set; }

    /// <summary>"cuda" on a GPU, "cuda-emulated" otherwise (the roofline columns treat "cuda" as a GPU row).</summary>
    public static IEnumerable<string> Devices => HasGpu ? ["cuda"] : ["cuda-emulated"];

    [ParamsSource(nameof(Devices))]
    public string Device { get; set; } = "cuda-emulated";

    private static bool HasGpu => CudaDriverStatus.Current.Devices.Count > 0;

    public static ModelConfig Config(string shape) => shape switch
    {
        "llama-3.2-1b" => ReferenceShapes.Llama32_1B,
        "llama-3.1-8b" => ReferenceShapes.Llama31_8B,
        _ => ReferenceShapes.Tiny,
    };

    /// <summary>Bytes of weights a decode step reads (bf16): every layer matrix and the LM head.</summary>
    public static long BytesPerDecodedToken(string shape)
    {
        var c = Config(shape);
        long perLayer = (long)c.HiddenSize * (c.Heads * c.HeadDim + 2 * c.KvHeads * c.HeadDim) + (long)c.Heads * c.HeadDim * c.HiddenSize
                        + 3L * c.HiddenSize * c.IntermediateSize;
        return 2 * (perLayer * c.Layers + (long)c.VocabularySize * c.HiddenSize);
    }

    /// <summary>The device's device-to-device copy bandwidth, measured in the setup (GB/s).</summary>
    public static double CopyGigabytesPerSecond { get; private set; }

    [GlobalSetup]
    public void Setup()
    {
        _device = new CudaDevice(Device == "cuda" ? new DriverBackend() : new EmulatorBackend());
        CopyGigabytesPerSecond = KernelBandwidth.CopyGigabytesPerSecond(_device, Device == "cuda" ? 1L << 30 : 1 << 20);
        var config = Config(Shape);
        int prompt = Device == "cuda" ? PromptTokens : 16;
        _model = CudaLlamaModel.Random(config, _device, DType.BF16, contextLength: prompt + 4096, prefillChunk: prompt);
        _session = _model.CreateSession(cudaGraphs: CudaGraphs);
        _prompt = Enumerable.Range(0, prompt).Select(i => i * 7919 % config.VocabularySize).ToArray();
        _next[0] = _session.ForwardSample(_prompt, SamplingOptions.Greedy, 1, 0, _stats, [], []);
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _session?.Dispose();
        _model?.Dispose();
        _device?.Dispose();
        (_session, _model, _device) = (null, null, null);
    }

    public void Dispose()
    {
        Cleanup();
        GC.SuppressFinalize(this);
    }

    /// <summary>One greedy decode step (the KV cache restarts after the prompt when it is about to fill).</summary>
    [Benchmark]
    public int Decode()
    {
        if (_session!.Length + 1 >= _session.Capacity)
        {
            _session.Reset();
            _next[0] = _session.ForwardSample(_prompt, SamplingOptions.Greedy, 1, 0, _stats, [], []);
        }
        _next[0] = _session.ForwardSample(_next, SamplingOptions.Greedy, 1, 0, _stats, [], []);
        return _next[0];
    }

    /// <summary>The prompt from an empty cache (prefill chunks of the whole prompt; CUDA graphs do not apply).</summary>
    [Benchmark]
    public int Prefill()
    {
        _session!.Reset();
        return _session.ForwardSample(_prompt, SamplingOptions.Greedy, 1, 0, _stats, [], []);
    }
}

using BenchmarkDotNet.Attributes;
using KernelLM.Runtime;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Driver;
using KernelLM.Runtime.Cuda.Ops;
using KernelLM.Runtime.Signals;

namespace KernelLM.Bench;

/// <summary>
/// The token signals of one decode step: one op = the fused vocabulary reduction of one row of logits
/// (<see cref="VocabStats"/>: max, log-sum-exp, entropy, the token's log-prob, top-16, margin, kurtosis; a token, no
/// reference row) on the CPU twin, and on the CUDA device when this machine has one (launch, then synchronise: the
/// latency a decode loop sees). Vocabularies: the embedded model's 2048, Llama 3's 128256, Qwen2's 151936. The row is
/// the same every op, as in decode, where the LM head has just written it (0.5 MB at most: it stays in L2).
/// Columns: GB/s = row bytes / time; "% of decode" = time / the embedded model's 1-thread decode step
/// (<see cref="DecodeBenchmark"/>) when that suite is in the same summary.
/// </summary>
public class VocabStatsBenchmark : IDisposable
{
    public const int TopK = 16;

    private float[] _logits = [];
    private ushort[] _bf16 = [];
    private readonly float[] _stats = new float[VocabStats.FieldCount];
    private readonly int[] _ids = new int[TopK];
    private readonly float[] _logProbs = new float[TopK];
    private int _token;
    private CudaDevice? _device;
    private readonly List<DeviceTensor> _tensors = [];
    private DeviceTensor? _row, _tokens, _workspace, _deviceStats, _deviceIds, _deviceLogProbs;

    [Params(2048, 128256, 151936)]
    public int Vocabulary { get; set; }

    [Params(DType.F32, DType.BF16)]
    public DType DType { get; set; }

    /// <summary>"cpu", and "cuda" where a GPU is present.</summary>
    public static IEnumerable<string> Devices => CudaDriverStatus.Current.Devices.Count > 0 ? ["cpu", "cuda"] : ["cpu"];

    [ParamsSource(nameof(Devices))]
    public string Device { get; set; } = "cpu";

    /// <summary>Bytes of the row: what one op must read.</summary>
    public static long RowBytes(int vocabulary, DType dtype) => (long)vocabulary * dtype.SizeOf();

    [GlobalSetup]
    public void Setup()
    {
        // Logits spread like a language model's: a broad body in [-9, 3) and a few strong candidates in [6, 10).
        var random = new Random(Vocabulary);
        _logits = new float[Vocabulary];
        for (int i = 0; i < Vocabulary; i++)
        {
            _logits[i] = (float)(random.NextDouble() * 12 - 9);
        }
        for (int i = 0; i < 5; i++)
        {
            _logits[random.Next(Vocabulary)] = (float)(6 + random.NextDouble() * 4);
        }
        _bf16 = _logits.Select(BFloat16.FromSingle).ToArray();
        _token = Vocabulary / 3;
        if (Device == "cuda")
        {
            _device = new CudaDevice(new DriverBackend());
            _row = Add(_device.Allocate("logits", DType, 1, Vocabulary));
            if (DType == DType.F32)
            {
                _row.Upload<float>(_logits);
            }
            else
            {
                _row.Upload<ushort>(_bf16);
            }
            _tokens = Add(_device.Allocate("tokens", DType.I32, 1));
            _tokens.Upload<int>([_token]);
            _workspace = Add(_device.Allocate("workspace", DType.I32, checked((int)((CudaOps.VocabStatsWorkspaceBytes(1, Vocabulary) + 3) / 4))));
            _deviceStats = Add(_device.Allocate("stats", DType.F32, 1, VocabStats.FieldCount));
            _deviceIds = Add(_device.Allocate("top_ids", DType.I32, 1, TopK));
            _deviceLogProbs = Add(_device.Allocate("top_log_probs", DType.F32, 1, TopK));
        }
    }

    private DeviceTensor Add(DeviceTensor tensor)
    {
        _tensors.Add(tensor);
        return tensor;
    }

    [Benchmark(Description = "vocab_stats 1 row")]
    public float Reduce()
    {
        if (_device is not null)
        {
            CudaOps.VocabStats(_device, _row!, Vocabulary, _tokens, null, TopK, _workspace!, _deviceStats!, _deviceIds, _deviceLogProbs);
            _device.Synchronize();
            return 0;
        }
        if (DType == DType.F32)
        {
            VocabStats.ReduceRow(_logits, _token, [], TopK, _stats, _ids, _logProbs);
        }
        else
        {
            VocabStats.Reduce(_bf16, Vocabulary, [_token], [], TopK, _stats, _ids, _logProbs);
        }
        return _stats[(int)VocabStatsField.LogSumExp];
    }

    [GlobalCleanup]
    public void Dispose()
    {
        foreach (var tensor in _tensors)
        {
            tensor.Dispose();
        }
        _tensors.Clear();
        _device?.Dispose();
        _device = null;
        GC.SuppressFinalize(this);
    }
}

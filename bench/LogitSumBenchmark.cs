using BenchmarkDotNet.Attributes;
using KernelLM.Runtime;
using KernelLM.Runtime.Composition;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Driver;
using KernelLM.Runtime.Cuda.Ops;

namespace KernelLM.Bench;

/// <summary>
/// The composition's own work in one decode step: the weighted sum of <see cref="Members"/> rows of
/// <see cref="Vocabulary"/> logits into one fp32 row (kernels/logit_sum.cu and its CPU twin <see cref="LogitSum"/>).
/// CPU: fp32 rows, 1 thread, in cache as after the LM heads. CUDA (where a GPU exists): bf16 rows, one launch and a
/// synchronise (the latency a decode loop sees). Bytes per op: Members x row bytes read + 4 x Vocabulary written.
/// </summary>
public class LogitSumBenchmark : IDisposable
{
    private float[][] _rows = [];
    private float[] _output = [];
    private CudaDevice? _device;
    private readonly List<DeviceTensor> _tensors = [];
    private LogitSumInput[] _inputs = [];
    private DeviceTensor? _deviceOutput;

    [Params(2048, 128256)]
    public int Vocabulary { get; set; }

    [Params(2, 3)]
    public int Members { get; set; }

    /// <summary>"cpu", and "cuda" where a GPU is present.</summary>
    public static IEnumerable<string> Devices => CudaDriverStatus.Current.Devices.Count > 0 ? ["cpu", "cuda"] : ["cpu"];

    [ParamsSource(nameof(Devices))]
    public string Device { get; set; } = "cpu";

    [GlobalSetup]
    public void Setup()
    {
        var random = new Random(Vocabulary + Members);
        _rows = [.. Enumerable.Range(0, Members).Select(_ => Enumerable.Range(0, Vocabulary).Select(_ => (float)(random.NextDouble() * 16 - 8)).ToArray())];
        _output = new float[Vocabulary];
        if (Device == "cuda")
        {
            _device = new CudaDevice(new DriverBackend());
            _inputs = new LogitSumInput[Members];
            for (int m = 0; m < Members; m++)
            {
                var tensor = _device.Allocate($"x{m}", DType.BF16, 1, Vocabulary);
                _tensors.Add(tensor);
                tensor.Upload<ushort>(_rows[m].Select(BFloat16.FromSingle).ToArray());
                _inputs[m] = new LogitSumInput(tensor, Vocabulary, 1f / (m + 1));
            }
            _deviceOutput = _device.Allocate("composed", DType.F32, 1, Vocabulary);
            _tensors.Add(_deviceOutput);
        }
    }

    [Benchmark(Description = "logit_sum 1 row")]
    public float Sum()
    {
        if (_device is not null)
        {
            CudaOps.LogitSum(_device, _inputs, Vocabulary, null, _deviceOutput!);
            _device.Synchronize();
            return 0;
        }
        for (int m = 0; m < _rows.Length; m++)
        {
            LogitSum.Accumulate(_rows[m], Vocabulary, 1f / (m + 1), _output, 1, Vocabulary, first: m == 0);
        }
        return _output[Vocabulary / 2];
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

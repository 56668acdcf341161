using System.Runtime.CompilerServices;
using KernelLM.Models.Llama;
using KernelLM.Models.Scoring;
using KernelLM.Models.Tokenization;
using KernelLM.Runtime;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Driver;
using KernelLM.Runtime.Cuda.Emulator;
using KernelLM.Runtime.Generation;

namespace KernelLM.Models;

/// <summary>
/// The embeddable engine: load a model folder once, then generate or score many times. One sequence state
/// is allocated at load and reused; concurrent requests are served one after another. Dispose frees the
/// memory map and every buffer.
/// </summary>
public sealed class LanguageModel : IDisposable
{
    private static long s_loads;

    private readonly SemaphoreSlim _gate = new(1, 1);
    private readonly IDecoderSession _session;
    private readonly CudaDevice? _cudaDevice;
    private readonly CudaLlamaModel? _cudaModel;
    private bool _ownsDevice = true;
    private readonly HfTokenizer _tokenizer;
    private bool _disposed;

    private LanguageModel(LlamaModel model, HfTokenizer tokenizer, CudaDevice? cudaDevice, CudaLlamaModel? cudaModel)
    {
        Model = model;
        _tokenizer = tokenizer;
        _cudaDevice = cudaDevice;
        _cudaModel = cudaModel;
        _session = cudaModel is null ? model.CreateSession() : cudaModel.CreateSession();
    }

    public LlamaModel Model { get; }
    public ModelConfig Config => Model.Config;
    public ITextTokenizer Tokenizer => _tokenizer;
    public string Directory => Model.Directory;
    public string DeviceName => _cudaDevice is null ? $"cpu ({Model.Device.ThreadCount} threads)" : _cudaDevice.Name;

    /// <summary>True when the model runs on a CUDA device (real or emulated).</summary>
    public bool IsCuda => _cudaModel is not null;

    /// <summary>Bytes of the sequence state (KV cache + activations, + workspace on a device) allocated at load.</summary>
    public long SessionBytes => _session switch
    {
        LlamaSession cpu => cpu.ByteLength,
        CudaLlamaSession cuda => cuda.ByteLength,
        _ => 0,
    };

    /// <summary>Device bytes of the uploaded weights (0 on the CPU, where the weights stay in the memory map).</summary>
    public long DeviceWeightBytes => _cudaModel?.WeightBytes ?? 0;

    /// <summary>Total device memory of the CUDA device (0 on the CPU).</summary>
    public long DeviceTotalBytes => _cudaDevice?.Backend.TotalMemoryBytes ?? 0;

    /// <summary>How the CUDA path runs (decode graphs, the prefill GEMM, the weight upload); null on the CPU.</summary>
    public string? DeviceEngine => _cudaModel is null || _session is not CudaLlamaSession session
        ? null
        : $"decode: {(session.UsesCudaGraphs ? "CUDA graphs (one per context bound)" : "kernel launches (CUDA graphs off)")}; "
          + $"prefill GEMM: {KernelLM.Runtime.Cuda.Ops.CudaOps.PrefillGemmEngine(_cudaDevice!)}; "
          + $"upload: {_cudaModel.UploadedBytes / 1e6:F1} MB through pinned staging in {_cudaModel.UploadTime.TotalMilliseconds:F0} ms";

    /// <summary>The embedded default model (tiny-stories) shipped next to the executable.</summary>
    public static string DefaultModelDirectory => Path.Combine(AppContext.BaseDirectory, "models", "tiny-stories");

    public static LanguageModel Load(string directory, ModelLoadOptions? options = null) => Load(directory, options, shareDeviceWith: null);

    /// <summary>
    /// Loads a model onto the CUDA device <paramref name="shareDeviceWith"/> already runs on (when both resolve to a
    /// CUDA device): a scoring reference then keeps its logits on the same device as the scored model, and the two
    /// are reduced together there. The device stays owned by the first model, which must outlive this one.
    /// </summary>
    public static LanguageModel Load(string directory, ModelLoadOptions? options, LanguageModel? shareDeviceWith)
    {
        options ??= new ModelLoadOptions();
        options.Validate();
        string device = ResolveDevice(options.Device);
        // The weights are uploaded from the memory map; prefetching them into RAM first would read them twice.
        var model = LlamaModel.Load(directory, device == "cpu" ? options : options with { Prefetch = false });
        HfTokenizer? tokenizer = null;
        CudaDevice? cudaDevice = null;
        CudaLlamaModel? cudaModel = null;
        try
        {
            tokenizer = HfTokenizer.Load(directory, model.Config.BosTokenId, model.Config.EosTokenIds);
            bool shared = false;
            if (device != "cpu")
            {
                shared = shareDeviceWith?._cudaDevice is { } existing && existing.Backend.IsEmulated == (device == "cuda-emulated");
                cudaDevice = shared ? shareDeviceWith!._cudaDevice : new CudaDevice(device == "cuda" ? new DriverBackend() : new EmulatorBackend());
                cudaModel = CudaLlamaModel.Upload(model, cudaDevice!);
            }
            return new LanguageModel(model, tokenizer, cudaDevice, cudaModel) { _ownsDevice = !shared };
        }
        catch
        {
            cudaModel?.Dispose();
            if (cudaDevice is not null && !ReferenceEquals(cudaDevice, shareDeviceWith?._cudaDevice))
            {
                cudaDevice.Dispose();
            }
            tokenizer?.Dispose();
            model.Dispose();
            throw;
        }
    }

    public int[] Encode(string text) => _tokenizer.Encode(text);

    /// <summary>Streams generated tokens; <paramref name="stats"/> (optional) is complete when the stream ends.</summary>
    public async IAsyncEnumerable<GeneratedToken> GenerateAsync(string prompt, GenerationOptions? options = null, GenerationStats? stats = null,
        [EnumeratorCancellation] CancellationToken cancellation = default)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        options ??= new GenerationOptions();
        options.Validate();
        int[] ids = _tokenizer.Encode(prompt);
        await _gate.WaitAsync(cancellation);
        try
        {
            foreach (var token in Generator.Run(_session, _tokenizer, ids, options, stats ?? new GenerationStats(), cancellation))
            {
                yield return token;
                await Task.Yield();
            }
        }
        finally
        {
            _gate.Release();
        }
    }

    /// <summary>Synchronous generation (CLI, tests); same semantics as <see cref="GenerateAsync"/>.</summary>
    public IEnumerable<GeneratedToken> Generate(string prompt, GenerationOptions? options = null, GenerationStats? stats = null,
        CancellationToken cancellation = default)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        options ??= new GenerationOptions();
        options.Validate();
        int[] ids = _tokenizer.Encode(prompt);
        return Locked(Generator.Run(_session, _tokenizer, ids, options, stats ?? new GenerationStats(), cancellation), cancellation);
    }

    private IEnumerable<GeneratedToken> Locked(IEnumerable<GeneratedToken> tokens, CancellationToken cancellation)
    {
        _gate.Wait(cancellation);
        try
        {
            foreach (var token in tokens)
            {
                yield return token;
            }
        }
        finally
        {
            _gate.Release();
        }
    }

    /// <summary>
    /// Teacher-forced scores of <paramref name="text"/> (tokenized with BOS as the tokenizer config says):
    /// for every position i >= 1, log p(token_i | tokens before i), the entropy, kurtosis and margin of that
    /// distribution (<see cref="Scorer"/>, which also scores against a reference model).
    /// </summary>
    public IReadOnlyList<TokenScore> Score(string text) => Score(_tokenizer.Encode(text));

    public IReadOnlyList<TokenScore> Score(int[] ids)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        using var scorer = new Scorer(this);
        return scorer.Score(ids).Positions;
    }

    internal HfTokenizer HfTokenizer => _tokenizer;

    /// <summary>
    /// Exclusive use of this model's sequence state until the lease is disposed (generation waits meanwhile).
    /// Leases on two models are taken in load order (<see cref="LoadOrder"/>), so that two scorers holding the
    /// same pair in opposite roles cannot deadlock.
    /// </summary>
    internal SessionLease LeaseSession()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        _gate.Wait();
        return new SessionLease(_session, _gate);
    }

    internal long LoadOrder { get; } = Interlocked.Increment(ref s_loads);

    /// <summary>cpu, cuda or cuda-emulated for an option value; auto is CUDA when the driver reports a usable device.</summary>
    public static string ResolveDevice(string option) => option switch
    {
        "auto" => CudaDriverStatus.Current.Problem is null ? "cuda" : "cpu",
        "cuda" => CheckDriver(),
        _ => option,
    };

    private static string CheckDriver()
    {
        CudaDriverStatus.Current.ThrowIfNoDevice();
        return "cuda";
    }

    internal readonly struct SessionLease(IDecoderSession session, SemaphoreSlim gate) : IDisposable
    {
        public IDecoderSession Session { get; } = session;

        public void Dispose() => gate.Release();
    }

    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }
        _disposed = true;
        _session.Dispose();
        _cudaModel?.Dispose();
        if (_ownsDevice)
        {
            _cudaDevice?.Dispose();
        }
        _tokenizer.Dispose();
        Model.Dispose();
        _gate.Dispose();
    }
}

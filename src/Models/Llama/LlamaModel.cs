using KernelLM.Runtime;
using KernelLM.Runtime.Cpu;
using KernelLM.Runtime.SafeTensors;

namespace KernelLM.Models.Llama;

/// <summary>One decoder layer's weights: matrices zero-copy in their stored dtype, norms and biases widened
/// to fp32 once (a few KB per layer).</summary>
public sealed class LlamaLayer
{
    public required WeightMatrix Query { get; init; }          // [heads * head_dim, hidden]
    public required WeightMatrix Key { get; init; }            // [kv_heads * head_dim, hidden]
    public required WeightMatrix Value { get; init; }          // [kv_heads * head_dim, hidden]
    public required WeightMatrix Output { get; init; }         // [hidden, heads * head_dim]
    public required WeightMatrix Gate { get; init; }           // [intermediate, hidden]
    public required WeightMatrix Up { get; init; }             // [intermediate, hidden]
    public required WeightMatrix Down { get; init; }           // [hidden, intermediate]
    public required float[] AttentionNorm { get; init; }       // [hidden]
    public required float[] MlpNorm { get; init; }             // [hidden]
    public float[] QueryBias { get; init; } = [];              // [heads * head_dim] or empty
    public float[] KeyBias { get; init; } = [];                // [kv_heads * head_dim] or empty
    public float[] ValueBias { get; init; } = [];              // [kv_heads * head_dim] or empty
    public float[] OutputBias { get; init; } = [];             // [hidden] or empty
}

/// <summary>Fraction of the weight bytes loaded so far, updated from the loading thread.</summary>
public sealed class LoadProgress
{
    private long _bits;

    public double Fraction
    {
        get => BitConverter.Int64BitsToDouble(Interlocked.Read(ref _bits));
        internal set => Interlocked.Exchange(ref _bits, BitConverter.DoubleToInt64Bits(value));
    }
}

/// <summary>Loader options.</summary>
public sealed record ModelLoadOptions
{
    /// <summary>auto | cpu | cuda | cuda-emulated. auto picks CUDA when the driver reports a device, else the CPU.</summary>
    public string Device { get; init; } = "auto";

    /// <summary>CPU threads; 0 = one per core.</summary>
    public int Threads { get; init; }

    /// <summary>Tokens a session's KV cache holds; 0 = min(max_position_embeddings, 4096).</summary>
    public int ContextLength { get; init; }

    /// <summary>Prompt tokens per forward chunk (bounds activation memory).</summary>
    public int PrefillChunk { get; init; } = 128;

    /// <summary>Touch every weight page at load (reads the files into memory up front, so the first token
    /// does not pay for page faults); progress is reported through <see cref="Progress"/>.</summary>
    public bool Prefetch { get; init; } = true;

    /// <summary>Receives the loaded fraction while weights are prefetched (progress bars).</summary>
    public LoadProgress? Progress { get; init; }

    /// <summary>TokenSelect KV-cache selection for the model's sessions (docs/kv-select.md); null = full attention.</summary>
    public KernelLM.Runtime.KvSelect.KvSelectOptions? KvSelect { get; init; }

    public void Validate()
    {
        if (Device is not ("auto" or "cpu" or "cuda" or "cuda-emulated"))
        {
            throw new InvalidParameterException("device", $"'{Device}' (one of: auto, cpu, cuda, cuda-emulated)");
        }
        if (Threads < 0)
        {
            throw new InvalidParameterException("threads", $"{Threads} (must be >= 0; 0 = one per core)");
        }
        if (ContextLength < 0)
        {
            throw new InvalidParameterException("context-length", $"{ContextLength} (must be >= 0; 0 = the model's, capped at 4096)");
        }
        if (PrefillChunk < 1)
        {
            throw new InvalidParameterException("prefill-chunk", $"{PrefillChunk} (must be >= 1)");
        }
        KvSelect?.Validate();
    }
}

/// <summary>
/// A Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2, TinyLlama, SmolLM) on the CPU device:
/// weights memory-mapped from safetensors, RoPE tables precomputed. Sessions (<see cref="CreateSession"/>)
/// hold the per-sequence state. The forward pass reads like the maths:
///   h = x + o_proj(attention(rope(q_proj(norm(x))), rope(k_proj(norm(x))), v_proj(norm(x))))
///   out = h + down_proj(silu(gate_proj(norm(h))) * up_proj(norm(h)))
/// </summary>
public sealed class LlamaModel : IDisposable
{
    private readonly SafeTensorsArchive _archive;

    private LlamaModel(string directory, ModelConfig config, SafeTensorsArchive archive, ModelLoadOptions options)
    {
        Directory = directory;
        Config = config;
        _archive = archive;
        Options = options;
        ContextLength = options.ContextLength > 0 ? options.ContextLength : Math.Min(config.MaxPositionEmbeddings, 4096);

        var weights = WeightMap.Resolve(config, archive, directory);
        Embedding = WeightMatrix.From(weights[(WeightRole.Embedding, 0)]);
        LmHead = weights.TryGetValue((WeightRole.LmHead, 0), out var head) ? WeightMatrix.From(head) : Embedding;
        FinalNorm = weights[(WeightRole.FinalNorm, 0)].ToFloatArray();
        Layers = new LlamaLayer[config.Layers];
        for (int i = 0; i < config.Layers; i++)
        {
            float[] Vector(WeightRole role) => weights.TryGetValue((role, i), out var tensor) ? tensor.ToFloatArray() : [];
            WeightMatrix Matrix(WeightRole role) => WeightMatrix.From(weights[(role, i)]);
            Layers[i] = new LlamaLayer
            {
                Query = Matrix(WeightRole.Query),
                Key = Matrix(WeightRole.Key),
                Value = Matrix(WeightRole.Value),
                Output = Matrix(WeightRole.Output),
                Gate = Matrix(WeightRole.Gate),
                Up = Matrix(WeightRole.Up),
                Down = Matrix(WeightRole.Down),
                AttentionNorm = Vector(WeightRole.AttentionNorm),
                MlpNorm = Vector(WeightRole.MlpNorm),
                QueryBias = Vector(WeightRole.QueryBias),
                KeyBias = Vector(WeightRole.KeyBias),
                ValueBias = Vector(WeightRole.ValueBias),
                OutputBias = Vector(WeightRole.OutputBias),
            };
        }
        (RopeCos, RopeSin) = RopeTable.Build(config, ContextLength);
        WeightBytes = weights.Values.Sum(tensor => tensor.ByteLength);
        if (options.Prefetch)
        {
            TouchPages(weights.Values, WeightBytes, options.Progress);
        }
        int threads = options.Threads > 0 ? options.Threads : Environment.ProcessorCount;
        Device = new CpuDevice(threads, Math.Max(ContextLength, Math.Max(config.HiddenSize, config.IntermediateSize)));
    }

    public string Directory { get; }
    public ModelConfig Config { get; }
    public ModelLoadOptions Options { get; }
    public int ContextLength { get; }
    public CpuDevice Device { get; }
    public WeightMatrix Embedding { get; }                       // [vocab, hidden]
    public WeightMatrix LmHead { get; }                          // [vocab, hidden]; the embedding when tied
    public float[] FinalNorm { get; }                            // [hidden]
    public LlamaLayer[] Layers { get; }
    public float[] RopeCos { get; }                              // [context, head_dim / 2]
    public float[] RopeSin { get; }                              // [context, head_dim / 2]

    /// <summary>Bytes of weights the forward pass reads (the tied head counted once).</summary>
    public long WeightBytes { get; }

    /// <summary>Bytes a decode step streams from memory: every layer matrix plus the LM head.</summary>
    public long BytesPerDecodedToken =>
        Layers.Sum(l => l.Query.ByteLength + l.Key.ByteLength + l.Value.ByteLength + l.Output.ByteLength + l.Gate.ByteLength + l.Up.ByteLength + l.Down.ByteLength)
        + LmHead.ByteLength;

    public IReadOnlyList<SafeTensorsFile> Files => _archive.Files;

    private static unsafe void TouchPages(IEnumerable<TensorView> tensors, long totalBytes, LoadProgress? progress)
    {
        const int Page = 4096;
        long done = 0;
        int sink = 0;
        foreach (var tensor in tensors)
        {
            for (long offset = 0; offset < tensor.ByteLength; offset += Page)
            {
                sink += tensor.Data[offset];
            }
            done += tensor.ByteLength;
            if (progress is not null)
            {
                progress.Fraction = totalBytes == 0 ? 1 : (double)done / totalBytes;
            }
        }
        GC.KeepAlive(sink);
    }

    public static LlamaModel Load(string directory, ModelLoadOptions? options = null)
    {
        options ??= new ModelLoadOptions();
        options.Validate();
        var config = ModelConfig.Load(directory);
        if (options.ContextLength > config.MaxPositionEmbeddings)
        {
            throw new InvalidParameterException("context-length", $"{options.ContextLength} exceeds the model's max_position_embeddings ({config.MaxPositionEmbeddings})");
        }
        var archive = SafeTensorsArchive.Open(directory);
        try
        {
            return new LlamaModel(directory, config, archive, options);
        }
        catch
        {
            archive.Dispose();
            throw;
        }
    }

    /// <summary>A new sequence state with its own KV cache of <paramref name="capacity"/> tokens (0 = the context length).</summary>
    public LlamaSession CreateSession(int capacity = 0) =>
        new(this, capacity > 0 ? Math.Min(capacity, ContextLength) : ContextLength, Options.PrefillChunk);

    public void Dispose()
    {
        Device.Dispose();
        _archive.Dispose();
    }
}

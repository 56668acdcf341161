using KernelLM.Runtime;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Ops;

namespace KernelLM.Models.Llama;

/// <summary>One layer's weights in device memory (matrices in the model's dtype, norms and biases fp32).</summary>
public sealed class CudaLlamaLayer
{
    public required DeviceTensor Query { get; init; }         // [heads * head_dim, hidden]
    public required DeviceTensor Key { get; init; }           // [kv_heads * head_dim, hidden]
    public required DeviceTensor Value { get; init; }         // [kv_heads * head_dim, hidden]
    public required DeviceTensor Output { get; init; }        // [hidden, heads * head_dim]
    public required DeviceTensor Gate { get; init; }          // [intermediate, hidden]
    public required DeviceTensor Up { get; init; }            // [intermediate, hidden]
    public required DeviceTensor Down { get; init; }          // [hidden, intermediate]
    public required DeviceTensor AttentionNorm { get; init; } // [hidden] f32
    public required DeviceTensor MlpNorm { get; init; }       // [hidden] f32
    public DeviceTensor? QueryBias { get; init; }             // [heads * head_dim] f32
    public DeviceTensor? KeyBias { get; init; }               // [kv_heads * head_dim] f32
    public DeviceTensor? ValueBias { get; init; }             // [kv_heads * head_dim] f32
    public DeviceTensor? OutputBias { get; init; }            // [hidden] f32
}

/// <summary>
/// A <see cref="LlamaModel"/>'s weights uploaded once to a CUDA device (real or emulated): every matrix in the
/// checkpoint's dtype, which is also the dtype of the device activations; norms, biases and RoPE inverse
/// frequencies in fp32. Device memory used = <see cref="WeightBytes"/> here, plus each session's KV cache and
/// workspace (<see cref="CudaLlamaSession.ByteLength"/>). Out of memory is a typed error naming the tensor that
/// did not fit, and everything uploaded before it is freed.
/// </summary>
public sealed class CudaLlamaModel : IDisposable
{
    private readonly List<DeviceTensor> _tensors = [];
    private StagedUpload? _staging;   // during UploadWeights

    private CudaLlamaModel(ModelConfig config, CudaDevice device, DType dtype, int contextLength, int prefillChunk, LlamaModel? model)
    {
        Config = config;
        Model = model;
        Device = device;
        DType = dtype;
        ContextLength = contextLength;
        PrefillChunk = prefillChunk;
    }

    private static CudaLlamaModel Build(CudaLlamaModel model, Action<CudaLlamaModel> fill)
    {
        try
        {
            fill(model);
            return model;
        }
        catch
        {
            model.FreeAll();
            throw;
        }
    }

    private void UploadWeights(LlamaModel model, ModelConfig config)
    {
        long matrixBytes = model.Layers.Sum(l => l.Query.ByteLength + l.Key.ByteLength + l.Value.ByteLength + l.Output.ByteLength
                                                 + l.Gate.ByteLength + l.Up.ByteLength + l.Down.ByteLength) + model.Embedding.ByteLength + model.LmHead.ByteLength;
        var clock = System.Diagnostics.Stopwatch.StartNew();
        using (_staging = new StagedUpload(Device, Math.Clamp(matrixBytes, 4096, StagedUpload.DefaultBufferBytes)))
        {
            UploadTensors(model, config);
            _staging.Finish();
            UploadedBytes = _staging.Bytes;
        }
        _staging = null;
        UploadTime = clock.Elapsed;
    }

    /// <summary>Bytes copied from the checkpoint to the device by <see cref="Upload"/> (through the staging buffers).</summary>
    public long UploadedBytes { get; private set; }

    /// <summary>Wall time of <see cref="Upload"/>'s copies (reading the map and the DMA, overlapped).</summary>
    public TimeSpan UploadTime { get; private set; }

    private unsafe void UploadTensors(LlamaModel model, ModelConfig config)
    {
        Embedding = UploadMatrix(model.Embedding);
        LmHead = model.LmHead.Data == model.Embedding.Data ? Embedding : UploadMatrix(model.LmHead);
        FinalNorm = UploadVector("model.norm.weight", model.FinalNorm);
        InverseFrequencies = UploadVector("rope.inv_freq", RopeTable.InverseFrequencies(config));
        Layers = new CudaLlamaLayer[config.Layers];
        for (int i = 0; i < config.Layers; i++)
        {
            var layer = model.Layers[i];
            string prefix = $"model.layers.{i}.";
            Layers[i] = new CudaLlamaLayer
            {
                Query = UploadMatrix(layer.Query),
                Key = UploadMatrix(layer.Key),
                Value = UploadMatrix(layer.Value),
                Output = UploadMatrix(layer.Output),
                Gate = UploadMatrix(layer.Gate),
                Up = UploadMatrix(layer.Up),
                Down = UploadMatrix(layer.Down),
                AttentionNorm = UploadVector(prefix + "input_layernorm.weight", layer.AttentionNorm),
                MlpNorm = UploadVector(prefix + "post_attention_layernorm.weight", layer.MlpNorm),
                QueryBias = OptionalVector(prefix + "self_attn.q_proj.bias", layer.QueryBias),
                KeyBias = OptionalVector(prefix + "self_attn.k_proj.bias", layer.KeyBias),
                ValueBias = OptionalVector(prefix + "self_attn.v_proj.bias", layer.ValueBias),
                OutputBias = OptionalVector(prefix + "self_attn.o_proj.bias", layer.OutputBias),
            };
        }
    }

    /// <summary>The host model the weights came from; null for <see cref="Random"/> weights.</summary>
    public LlamaModel? Model { get; }
    public CudaDevice Device { get; }
    public ModelConfig Config { get; }

    /// <summary>Tokens a session's KV cache holds by default.</summary>
    public int ContextLength { get; }

    /// <summary>Prompt tokens per forward chunk of a session.</summary>
    public int PrefillChunk { get; }

    /// <summary>The dtype of the matrices and of every device activation.</summary>
    public DType DType { get; }

    public DeviceTensor Embedding { get; private set; } = null!;          // [vocab, hidden]
    public DeviceTensor LmHead { get; private set; } = null!;             // [vocab, hidden]; the embedding when tied
    public DeviceTensor FinalNorm { get; private set; } = null!;          // [hidden] f32
    public DeviceTensor InverseFrequencies { get; private set; } = null!; // [head_dim / 2] f32, rope_scaling applied
    public CudaLlamaLayer[] Layers { get; private set; } = [];

    /// <summary>Device bytes of the weights.</summary>
    public long WeightBytes => _tensors.Sum(t => t.ByteLength);

    /// <summary>
    /// Uploads <paramref name="model"/>'s weights to <paramref name="device"/> (which the result does not own).
    /// <paramref name="activations"/>: the device dtype of matrices and activations; null keeps the checkpoint's,
    /// F32 widens bf16 / f16 matrices on the device at upload (twice the memory; fp32 activations, as the CPU).
    /// </summary>
    public static CudaLlamaModel Upload(LlamaModel model, CudaDevice device, DType? activations = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(device);
        var dtype = model.Layers[0].Query.DType;
        var matrices = model.Layers.SelectMany(l => new[] { l.Query, l.Key, l.Value, l.Output, l.Gate, l.Up, l.Down })
            .Append(model.Embedding).Append(model.LmHead);
        foreach (var matrix in matrices)
        {
            if (matrix.DType != dtype)
            {
                throw new ModelConfigException(
                    $"{model.Directory}: tensor '{matrix.Name}' is {matrix.DType} but '{model.Layers[0].Query.Name}' is {dtype}; the CUDA device runs one dtype per model");
            }
        }
        if (activations is { } wanted && wanted != dtype && wanted != DType.F32)
        {
            throw new InvalidParameterException("device dtype", $"{wanted}: the device runs a model in its checkpoint dtype ({dtype}) or in F32");
        }
        var result = new CudaLlamaModel(model.Config, device, activations ?? dtype, model.ContextLength, model.Options.PrefillChunk, model);
        return Build(result, m => m.UploadWeights(model, model.Config));
    }

    /// <summary>
    /// A model of <paramref name="config"/>'s shapes with seeded random weights generated on the device (no host
    /// copy): matrices uniform in ±1/sqrt(in_features) so activations stay O(1), norms 1, biases 0. For
    /// benchmarks, where the shapes decide the speed and the values do not matter.
    /// </summary>
    public static CudaLlamaModel Random(ModelConfig config, CudaDevice device, DType dtype, int contextLength, int prefillChunk = 128, ulong seed = 1)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(device);
        var result = new CudaLlamaModel(config, device, dtype, contextLength, prefillChunk, null);
        return Build(result, m => m.Generate(seed));
    }

    private void Generate(ulong seed)
    {
        var c = Config;
        DeviceTensor Matrix(string name, int rows, int cols)
        {
            var tensor = Allocate(name, DType, rows, cols);
            CudaOps.FillUniform(Device, tensor, seed++, 1f / MathF.Sqrt(cols));
            return tensor;
        }
        DeviceTensor Constant(string name, int length, float value)
        {
            var tensor = Allocate(name, DType.F32, length);
            CudaOps.FillConstant(Device, tensor, value);
            return tensor;
        }
        Embedding = Matrix("model.embed_tokens.weight", c.VocabularySize, c.HiddenSize);
        LmHead = c.TieWordEmbeddings ? Embedding : Matrix("lm_head.weight", c.VocabularySize, c.HiddenSize);
        FinalNorm = Constant("model.norm.weight", c.HiddenSize, 1);
        InverseFrequencies = UploadVector("rope.inv_freq", RopeTable.InverseFrequencies(c));
        Layers = new CudaLlamaLayer[c.Layers];
        for (int i = 0; i < c.Layers; i++)
        {
            string prefix = $"model.layers.{i}.";
            Layers[i] = new CudaLlamaLayer
            {
                Query = Matrix(prefix + "self_attn.q_proj.weight", c.Heads * c.HeadDim, c.HiddenSize),
                Key = Matrix(prefix + "self_attn.k_proj.weight", c.KvHeads * c.HeadDim, c.HiddenSize),
                Value = Matrix(prefix + "self_attn.v_proj.weight", c.KvHeads * c.HeadDim, c.HiddenSize),
                Output = Matrix(prefix + "self_attn.o_proj.weight", c.HiddenSize, c.Heads * c.HeadDim),
                Gate = Matrix(prefix + "mlp.gate_proj.weight", c.IntermediateSize, c.HiddenSize),
                Up = Matrix(prefix + "mlp.up_proj.weight", c.IntermediateSize, c.HiddenSize),
                Down = Matrix(prefix + "mlp.down_proj.weight", c.HiddenSize, c.IntermediateSize),
                AttentionNorm = Constant(prefix + "input_layernorm.weight", c.HiddenSize, 1),
                MlpNorm = Constant(prefix + "post_attention_layernorm.weight", c.HiddenSize, 1),
                QueryBias = c.QkvBias ? Constant(prefix + "self_attn.q_proj.bias", c.Heads * c.HeadDim, 0) : null,
                KeyBias = c.QkvBias ? Constant(prefix + "self_attn.k_proj.bias", c.KvHeads * c.HeadDim, 0) : null,
                ValueBias = c.QkvBias ? Constant(prefix + "self_attn.v_proj.bias", c.KvHeads * c.HeadDim, 0) : null,
                OutputBias = c.OutputBias ? Constant(prefix + "self_attn.o_proj.bias", c.HiddenSize, 0) : null,
            };
        }
        Device.Synchronize();
    }

    /// <summary>Bytes one decode step reads from the weights: every layer matrix and the LM head (the embedding
    /// contributes one row, which is negligible and not counted unless it is the tied LM head).</summary>
    public long BytesPerDecodedToken =>
        Layers.Sum(l => l.Query.ByteLength + l.Key.ByteLength + l.Value.ByteLength + l.Output.ByteLength + l.Gate.ByteLength + l.Up.ByteLength + l.Down.ByteLength)
        + LmHead.ByteLength;

    private DeviceTensor Allocate(string name, DType dtype, params int[] shape)
    {
        var tensor = DeviceMemory.Allocate(Device, name, dtype, shape, $"after {WeightBytes:N0} bytes of weights");
        _tensors.Add(tensor);
        return tensor;
    }

    /// <summary>A matrix on the device in the model's dtype (widened there when the checkpoint's is narrower).</summary>
    private unsafe DeviceTensor UploadMatrix(in WeightMatrix matrix)
    {
        if (matrix.DType == DType)
        {
            var tensor = Allocate(matrix.Name, matrix.DType, matrix.Rows, matrix.Cols);
            Copy(tensor, matrix);
            return tensor;
        }
        // Widened on the device: the checkpoint's bytes go up once into a staging tensor, then convert.
        var widened = Allocate(matrix.Name, DType, matrix.Rows, matrix.Cols);
        using var staging = DeviceMemory.Allocate(Device, matrix.Name + " (staging)", matrix.DType, [matrix.Rows, matrix.Cols], $"after {WeightBytes:N0} bytes of weights");
        Copy(staging, matrix);
        _staging?.Finish();
        CudaOps.Convert(Device, staging, widened);
        Device.Synchronize();
        return widened;
    }

    /// <summary>Copies a matrix from the memory map through the staging buffers (pieces of at most 256 MB per span).</summary>
    private unsafe void Copy(DeviceTensor tensor, in WeightMatrix matrix)
    {
        const long piece = 256L << 20;
        for (long offset = 0; offset < matrix.ByteLength; offset += piece)
        {
            int length = (int)Math.Min(piece, matrix.ByteLength - offset);
            var source = new ReadOnlySpan<byte>(matrix.Data + offset, length);
            if (_staging is null)
            {
                Device.Backend.CopyHostToDevice(tensor.Address + (ulong)offset, source, 0);
            }
            else
            {
                _staging.Copy(tensor.Address + (ulong)offset, source);
            }
        }
    }

    private DeviceTensor UploadVector(string name, float[] values)
    {
        var tensor = Allocate(name, DType.F32, values.Length);
        tensor.Upload<float>(values);
        return tensor;
    }

    private DeviceTensor? OptionalVector(string name, float[] values) => values.Length == 0 ? null : UploadVector(name, values);

    /// <summary>A new sequence with its own device KV cache of <paramref name="capacity"/> tokens (0 = the model's context).
    /// <paramref name="cudaGraphs"/>: capture the decode step as CUDA graphs (null: yes unless KERNELLM_CUDA_GRAPHS=0).</summary>
    public CudaLlamaSession CreateSession(int capacity = 0, bool? cudaGraphs = null) =>
        new(this, capacity > 0 ? Math.Min(capacity, ContextLength) : ContextLength, PrefillChunk, cudaGraphs ?? CudaGraphsByDefault);

    /// <summary>Whether sessions capture their decode step as CUDA graphs unless told: yes, unless the environment
    /// variable KERNELLM_CUDA_GRAPHS is "0".</summary>
    public static bool CudaGraphsByDefault => Environment.GetEnvironmentVariable("KERNELLM_CUDA_GRAPHS") != "0";

    private void FreeAll()
    {
        foreach (var tensor in _tensors)
        {
            tensor.Dispose();
        }
        _tensors.Clear();
    }

    public void Dispose() => FreeAll();
}

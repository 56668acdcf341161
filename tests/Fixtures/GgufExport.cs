using System.Buffers.Binary;
using System.Globalization;
using System.Text;
using System.Text.Json;

namespace KernelLM.Tests.Fixtures;

public sealed record GgufExportOptions
{
    /// <summary>
    /// Apply convert_hf_to_gguf's q/k row permutation for the `llama` architecture (the default, as the converter
    /// does). False writes the rotate-half rows unchanged: a deliberately wrong file, which the conformance tests
    /// use to show that their comparison can fail.
    /// </summary>
    public bool PermuteQueryKey { get; init; } = true;

    /// <summary>
    /// Write the rope_freqs.weight tensor for rope_scaling llama3 (the default, as the converter does). False
    /// leaves llama.cpp with unscaled RoPE: another deliberately wrong file for the tests' negative checks.
    /// </summary>
    public bool Llama3RopeFrequencies { get; init; } = true;
}

/// <summary>
/// Exports a Hugging Face Llama / Mistral / Qwen2 folder (config.json, *.safetensors, optional tokenizer.json)
/// to one GGUF file the way llama.cpp's convert_hf_to_gguf.py does for these architectures, so that llama.cpp
/// runs the same weights as KernelLM. Independent of KernelLM's own loader on purpose: config.json and the
/// safetensors headers are parsed here, with transformers' defaults, so a misreading in src/ cannot cancel out.
///
/// What the converter does and this reproduces:
/// - Architecture: LlamaForCausalLM and MistralForCausalLM become `llama`, Qwen2ForCausalLM becomes `qwen2`.
/// - `llama` q_proj / k_proj weights (and biases) are permuted: llama.cpp's `llama` graph applies RoPE to
///   adjacent pairs (x_2i, x_2i+1) (GGML_ROPE_TYPE_NORM, Meta's original layout), while HF checkpoints are in
///   the rotate-half layout (x_i, x_i+d/2). LlamaModel.permute: per head (of n_head for q, n_head_kv for k),
///   reshape(n_head, 2, d/2, ...).swapaxes(1, 2): new row 2i + j of a head = old row j * d/2 + i.
///   `qwen2` runs NEOX-style RoPE (rotate-half) and is not permuted.
/// - Matrices keep their stored dtype (F32 / F16 / BF16: the converter's --outtype set to the checkpoint's);
///   1-D tensors (norms, biases) are widened to F32, as the converter stores every 1-D tensor.
///   Dimensions are ggml's, innermost first: a PyTorch [out, in] weight is ne = [in, out], same bytes.
/// - rope_scaling llama3: no scaling metadata; a `rope_freqs.weight` F32 tensor [head_dim / 2] of per-frequency
///   divisors (LlamaModel.generate_extra_tensors): 1 for wavelengths below original / high_freq_factor,
///   factor above original / low_freq_factor, 1 / ((1 - smooth) / factor + smooth) in between. llama.cpp divides
///   each theta_i by it. (The converter reads original_max_position_embeddings from the top level of config.json,
///   default 8192, which is what real Llama 3.x configs have inside rope_scaling; transformers reads it from
///   rope_scaling, and so does this export, so the synthetic models' small original context is honoured.)
///   rope_scaling linear: rope.scaling.type = "linear", rope.scaling.factor.
/// - Tied embeddings: no output.weight; llama.cpp then uses token_embd.weight as the head.
/// - Vocabulary: tokenizer.ggml.model "gpt2" (byte-level BPE) with the tokens, types and merges of
///   tokenizer.json, padded with [PAD{id}] tokens to vocab_size as the converter pads. The converter picks
///   tokenizer.ggml.pre by hashing a test tokenization; the tests' tokenizer is GPT-2's ByteLevel pre-tokenizer,
///   so "gpt-2" is written. Without tokenizer.json (benchmark models), a byte-level vocabulary of vocab_size is
///   synthesised: the 256 byte symbols, then unique "Ġtok{id}" pieces and no merges. Both engines are fed token
///   ids, so the vocabulary only has to load.
/// - Mistral's sliding_window is not written: llama.cpp's `llama` architecture has no sliding window, so Mistral
///   checkpoints converted this way attend to the whole context (LlamaCppConformanceTests pins that down).
/// </summary>
public static class GgufExport
{
    public static void Export(string modelDirectory, string ggufPath, GgufExportOptions? options = null)
    {
        var writer = Prepare(modelDirectory, options ?? new GgufExportOptions());
        writer.Write(ggufPath);
    }

    public static GgufWriter Prepare(string modelDirectory, GgufExportOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        using var document = JsonDocument.Parse(File.ReadAllBytes(Path.Combine(modelDirectory, "config.json")));
        var config = document.RootElement;
        string hfArchitecture = config.GetProperty("architectures")[0].GetString()!;
        string architecture = hfArchitecture switch
        {
            "LlamaForCausalLM" or "MistralForCausalLM" => "llama",
            "Qwen2ForCausalLM" => "qwen2",
            _ => throw new NotSupportedException($"GGUF export: architecture {hfArchitecture} is not one of Llama, Mistral, Qwen2"),
        };
        int hidden = Int(config, "hidden_size")!.Value;
        int heads = Int(config, "num_attention_heads")!.Value;
        int kvHeads = Int(config, "num_key_value_heads") ?? heads;
        int? explicitHeadDim = Int(config, "head_dim");
        int headDim = explicitHeadDim ?? hidden / heads;
        int layers = Int(config, "num_hidden_layers")!.Value;
        int vocabulary = Int(config, "vocab_size")!.Value;
        // transformers' config-class defaults for max_position_embeddings: Llama 2048, Mistral 4096 * 32, Qwen2 32768.
        int contextLength = Int(config, "max_position_embeddings") ?? hfArchitecture switch
        {
            "MistralForCausalLM" => 4096 * 32,
            "Qwen2ForCausalLM" => 32768,
            _ => 2048,
        };

        var writer = new GgufWriter();
        writer.Add("general.architecture", architecture);
        writer.Add("general.name", Path.GetFileName(Path.TrimEndingDirectorySeparator(modelDirectory)));
        writer.Add($"{architecture}.block_count", (uint)layers);
        writer.Add($"{architecture}.context_length", (uint)contextLength);
        writer.Add($"{architecture}.embedding_length", (uint)hidden);
        writer.Add($"{architecture}.feed_forward_length", (uint)Int(config, "intermediate_size")!.Value);
        writer.Add($"{architecture}.attention.head_count", (uint)heads);
        writer.Add($"{architecture}.attention.head_count_kv", (uint)kvHeads);
        writer.Add($"{architecture}.rope.freq_base", (float)(Double(config, "rope_theta") ?? 10000.0));
        writer.Add($"{architecture}.attention.layer_norm_rms_epsilon", (float)(Double(config, "rms_norm_eps") ?? 1e-6));
        if (explicitHeadDim is not null)
        {
            writer.Add($"{architecture}.attention.key_length", (uint)headDim);
            writer.Add($"{architecture}.attention.value_length", (uint)headDim);
        }
        if (architecture == "llama")
        {
            writer.Add("llama.vocab_size", (uint)vocabulary);
            writer.Add("llama.rope.dimension_count", (uint)headDim);
        }

        float[]? ropeFactors = null;
        if (config.TryGetProperty("rope_scaling", out var scaling) && scaling.ValueKind == JsonValueKind.Object)
        {
            string type = (scaling.TryGetProperty("rope_type", out var t) ? t : scaling.GetProperty("type")).GetString()!;
            switch (type)
            {
                case "default":
                    break;
                case "linear":
                    writer.Add($"{architecture}.rope.scaling.type", "linear");
                    writer.Add($"{architecture}.rope.scaling.factor", (float)Double(scaling, "factor")!.Value);
                    break;
                case "llama3":
                    ropeFactors = Llama3RopeFactors(Double(config, "rope_theta") ?? 10000.0, headDim, Double(scaling, "factor") ?? 8.0,
                        Double(scaling, "low_freq_factor") ?? 1.0, Double(scaling, "high_freq_factor") ?? 4.0,
                        Int(scaling, "original_max_position_embeddings") ?? Int(config, "original_max_position_embeddings") ?? 8192);
                    break;
                default:
                    throw new NotSupportedException($"GGUF export: rope_scaling type '{type}'");
            }
        }

        AddVocabulary(writer, modelDirectory, config, vocabulary);

        var tensors = SafeTensorsIndex.Open(modelDirectory);
        string firstMatrixDtype = tensors.Values.First(tensor => tensor.Shape.Length == 2).DType;
        writer.Add("general.file_type", firstMatrixDtype switch
        {
            "F32" => 0u,   // LLAMA_FTYPE_ALL_F32
            "F16" => 1u,   // LLAMA_FTYPE_MOSTLY_F16
            "BF16" => 32u, // LLAMA_FTYPE_MOSTLY_BF16
            _ => throw new NotSupportedException($"GGUF export: dtype {firstMatrixDtype}"),
        });
        writer.Add("general.quantization_version", 2u);

        if (ropeFactors is not null && options.Llama3RopeFrequencies)
        {
            writer.AddTensor("rope_freqs.weight", GgmlType.GGML_TYPE_F32, [ropeFactors.Length], GgufWriter.F32Bytes(ropeFactors));
        }
        foreach (var (name, tensor) in tensors.OrderBy(pair => TensorOrder(pair.Key)).ThenBy(pair => pair.Key, StringComparer.Ordinal))
        {
            if (name.EndsWith(".rotary_emb.inv_freq", StringComparison.Ordinal))
            {
                continue; // the converter drops recomputed RoPE tables too
            }
            string ggufName = TensorName(name);
            int permuteHeads = 0;
            if (architecture == "llama" && options.PermuteQueryKey)
            {
                if (name.EndsWith(".self_attn.q_proj.weight", StringComparison.Ordinal) || name.EndsWith(".self_attn.q_proj.bias", StringComparison.Ordinal))
                {
                    permuteHeads = heads;
                }
                else if (name.EndsWith(".self_attn.k_proj.weight", StringComparison.Ordinal) || name.EndsWith(".self_attn.k_proj.bias", StringComparison.Ordinal))
                {
                    permuteHeads = kvHeads;
                }
            }
            AddTensor(writer, ggufName, tensor, permuteHeads);
        }
        return writer;
    }

    /// <summary>convert_hf_to_gguf LlamaModel.generate_extra_tensors for rope_type llama3: per-frequency divisors of theta.</summary>
    public static float[] Llama3RopeFactors(double theta, int headDim, double factor, double lowFrequencyFactor, double highFrequencyFactor, int original)
    {
        double lowWavelength = original / lowFrequencyFactor;
        double highWavelength = original / highFrequencyFactor;
        var factors = new float[headDim / 2];
        for (int i = 0; i < factors.Length; i++)
        {
            // freqs = 1 / base ** (arange(0, dim, 2, float32) / dim), in fp32 as torch computes it.
            float frequency = 1f / MathF.Pow((float)theta, (float)(2 * i) / headDim);
            double wavelength = 2 * Math.PI / frequency;
            if (wavelength < highWavelength)
            {
                factors[i] = 1;
            }
            else if (wavelength > lowWavelength)
            {
                factors[i] = (float)factor;
            }
            else
            {
                double smooth = (original / wavelength - lowFrequencyFactor) / (highFrequencyFactor - lowFrequencyFactor);
                factors[i] = (float)(1 / ((1 - smooth) / factor + smooth));
            }
        }
        return factors;
    }

    /// <summary>HF tensor name → GGUF tensor name (gguf-py's TensorNameMap for these architectures).</summary>
    public static string TensorName(string hfName)
    {
        switch (hfName)
        {
            case "model.embed_tokens.weight":
                return "token_embd.weight";
            case "model.norm.weight":
                return "output_norm.weight";
            case "lm_head.weight":
                return "output.weight";
        }
        const string Prefix = "model.layers.";
        if (hfName.StartsWith(Prefix, StringComparison.Ordinal))
        {
            int dot = hfName.IndexOf('.', Prefix.Length);
            string layer = hfName[Prefix.Length..dot];
            string rest = hfName[(dot + 1)..];
            int suffixAt = rest.LastIndexOf('.');
            string module = rest[..suffixAt];
            string suffix = rest[(suffixAt + 1)..];
            string? block = module switch
            {
                "input_layernorm" => "attn_norm",
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "post_attention_layernorm" => "ffn_norm",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                _ => null,
            };
            if (block is not null && suffix is "weight" or "bias")
            {
                return $"blk.{layer}.{block}.{suffix}";
            }
        }
        throw new NotSupportedException($"GGUF export: cannot map tensor '{hfName}'");
    }

    /// <summary>The converter's order: global tensors first, then blocks in order (not needed by llama.cpp; it keeps files readable).</summary>
    private static int TensorOrder(string hfName)
    {
        const string Prefix = "model.layers.";
        if (!hfName.StartsWith(Prefix, StringComparison.Ordinal))
        {
            return hfName == "model.embed_tokens.weight" ? -1 : int.MaxValue;
        }
        int dot = hfName.IndexOf('.', Prefix.Length);
        return int.Parse(hfName.AsSpan(Prefix.Length, dot - Prefix.Length), CultureInfo.InvariantCulture);
    }

    private static void AddTensor(GgufWriter writer, string name, SafeTensorsIndex.Entry tensor, int permuteHeads)
    {
        long[] dimensions = tensor.Shape.Reverse().Select(dimension => (long)dimension).ToArray();
        int elementSize = tensor.DType switch
        {
            "F32" => 4,
            "F16" or "BF16" => 2,
            _ => throw new NotSupportedException($"GGUF export: tensor {tensor.Name} has dtype {tensor.DType}"),
        };
        if (tensor.Shape.Length == 1)
        {
            // 1-D tensors are stored F32 (exact widening of F16 / BF16).
            float[] values = ToFloats(tensor.ReadAll(), tensor.DType);
            if (permuteHeads > 0)
            {
                values = Permute(values, permuteHeads, 1);
            }
            writer.AddTensor(name, GgmlType.GGML_TYPE_F32, dimensions, GgufWriter.F32Bytes(values));
            return;
        }
        var type = tensor.DType switch
        {
            "F32" => GgmlType.GGML_TYPE_F32,
            "F16" => GgmlType.GGML_TYPE_F16,
            _ => GgmlType.GGML_TYPE_BF16,
        };
        if (permuteHeads == 0)
        {
            writer.AddTensor(name, type, dimensions, stream => tensor.CopyTo(stream));
            return;
        }
        writer.AddTensor(name, type, dimensions, stream =>
        {
            byte[] data = tensor.ReadAll();
            int rowBytes = tensor.Shape[1] * elementSize;
            var permuted = Permute(Enumerable.Range(0, tensor.Shape[0]).ToArray(), permuteHeads, 1);
            foreach (int row in permuted)
            {
                stream.Write(data, row * rowBytes, rowBytes);
            }
        });
    }

    /// <summary>
    /// LlamaModel.permute on a list of rows (or elements): for each of <paramref name="heads"/> heads of d rows,
    /// output row 2i + j is input row j * d/2 + i (reshape(heads, 2, d/2).swapaxes(1, 2)).
    /// </summary>
    public static T[] Permute<T>(T[] rows, int heads, int rowWidth)
    {
        ArgumentNullException.ThrowIfNull(rows);
        int d = rows.Length / rowWidth / heads;
        if (d * heads * rowWidth != rows.Length || d % 2 != 0)
        {
            throw new ArgumentException($"permute: {rows.Length} rows do not split into {heads} heads of an even size");
        }
        var result = new T[rows.Length];
        int half = d / 2;
        for (int h = 0; h < heads; h++)
        {
            for (int i = 0; i < half; i++)
            {
                for (int j = 0; j < 2; j++)
                {
                    int source = h * d + j * half + i;
                    int target = h * d + 2 * i + j;
                    Array.Copy(rows, source * rowWidth, result, target * rowWidth, rowWidth);
                }
            }
        }
        return result;
    }

    private static float[] ToFloats(byte[] data, string dtype)
    {
        switch (dtype)
        {
            case "F32":
                return Enumerable.Range(0, data.Length / 4).Select(i => BinaryPrimitives.ReadSingleLittleEndian(data.AsSpan(4 * i))).ToArray();
            case "F16":
                return Enumerable.Range(0, data.Length / 2).Select(i => (float)BinaryPrimitives.ReadHalfLittleEndian(data.AsSpan(2 * i))).ToArray();
            case "BF16":
                return Enumerable.Range(0, data.Length / 2)
                    .Select(i => BitConverter.Int32BitsToSingle(BinaryPrimitives.ReadUInt16LittleEndian(data.AsSpan(2 * i)) << 16)).ToArray();
            default:
                throw new NotSupportedException($"GGUF export: dtype {dtype}");
        }
    }

    // ---------------------------------------------------------------- vocabulary

    private const int TokenNormal = 1;       // llama_token_type LLAMA_TOKEN_TYPE_NORMAL
    private const int TokenControl = 3;      // LLAMA_TOKEN_TYPE_CONTROL
    private const int TokenUserDefined = 4;  // LLAMA_TOKEN_TYPE_USER_DEFINED

    private static void AddVocabulary(GgufWriter writer, string modelDirectory, JsonElement config, int vocabulary)
    {
        var tokens = new string?[vocabulary];
        var types = new int[vocabulary];
        var merges = new List<string>();
        string tokenizerPath = Path.Combine(modelDirectory, "tokenizer.json");
        int? bos = FirstId(config, "bos_token_id");
        int? eos = FirstId(config, "eos_token_id");
        if (File.Exists(tokenizerPath))
        {
            using var document = JsonDocument.Parse(File.ReadAllBytes(tokenizerPath));
            var model = document.RootElement.GetProperty("model");
            if (model.GetProperty("type").GetString() != "BPE")
            {
                throw new NotSupportedException("GGUF export: only byte-level BPE tokenizers (tokenizer.ggml.model gpt2)");
            }
            foreach (var entry in model.GetProperty("vocab").EnumerateObject())
            {
                int id = entry.Value.GetInt32();
                tokens[id] = entry.Name;
                types[id] = TokenNormal;
            }
            foreach (var added in document.RootElement.GetProperty("added_tokens").EnumerateArray())
            {
                int id = added.GetProperty("id").GetInt32();
                tokens[id] = added.GetProperty("content").GetString();
                types[id] = added.GetProperty("special").GetBoolean() ? TokenControl : TokenUserDefined;
            }
            foreach (var merge in model.GetProperty("merges").EnumerateArray())
            {
                // "a b" (tokenizers < 0.20) or ["a", "b"]; GGUF stores "a b".
                merges.Add(merge.ValueKind == JsonValueKind.String ? merge.GetString()! : $"{merge[0].GetString()} {merge[1].GetString()}");
            }
            for (int id = 0; id < vocabulary; id++)
            {
                if (tokens[id] is null)
                {
                    tokens[id] = $"[PAD{id}]";
                    types[id] = TokenUserDefined;
                }
            }
        }
        else
        {
            var byteSymbols = ByteLevelAlphabet();
            for (int id = 0; id < vocabulary; id++)
            {
                tokens[id] = id < 256 ? byteSymbols[id].ToString() : $"Ġtok{id}";
                types[id] = id == bos || id == eos ? TokenControl : TokenNormal;
            }
        }
        writer.Add("tokenizer.ggml.model", "gpt2");
        writer.Add("tokenizer.ggml.pre", "gpt-2");
        writer.Add("tokenizer.ggml.tokens", tokens.Select(token => token!).ToArray());
        writer.Add("tokenizer.ggml.token_type", types);
        writer.Add("tokenizer.ggml.merges", merges);
        if (bos is int bosId)
        {
            writer.Add("tokenizer.ggml.bos_token_id", (uint)bosId);
        }
        if (eos is int eosId)
        {
            writer.Add("tokenizer.ggml.eos_token_id", (uint)eosId);
        }
    }

    /// <summary>GPT-2's bytes_to_unicode: printable bytes map to themselves, the others to U+0100 upwards.</summary>
    private static char[] ByteLevelAlphabet()
    {
        var symbols = new char[256];
        int next = 256;
        for (int b = 0; b < 256; b++)
        {
            bool printable = b is >= '!' and <= '~' or >= 0xA1 and <= 0xAC or >= 0xAE and <= 0xFF;
            symbols[b] = printable ? (char)b : (char)next++;
        }
        return symbols;
    }

    // ---------------------------------------------------------------- config.json helpers

    private static int? Int(JsonElement element, string name) =>
        element.TryGetProperty(name, out var value) && value.ValueKind == JsonValueKind.Number ? value.GetInt32() : null;

    private static double? Double(JsonElement element, string name) =>
        element.TryGetProperty(name, out var value) && value.ValueKind == JsonValueKind.Number ? value.GetDouble() : null;

    private static int? FirstId(JsonElement element, string name)
    {
        if (!element.TryGetProperty(name, out var value))
        {
            return null;
        }
        return value.ValueKind switch
        {
            JsonValueKind.Number => value.GetInt32(),
            JsonValueKind.Array when value.GetArrayLength() > 0 => value[0].GetInt32(),
            _ => null,
        };
    }

    /// <summary>The tensors of every *.safetensors file in a folder, read from their headers (no memory map).</summary>
    private sealed class SafeTensorsIndex : Dictionary<string, SafeTensorsIndex.Entry>
    {
        public sealed record Entry(string Name, string DType, int[] Shape, string Path, long Offset, long Length)
        {
            public byte[] ReadAll()
            {
                var data = new byte[Length];
                using var file = new FileStream(Path, FileMode.Open, FileAccess.Read, FileShare.Read);
                file.Seek(Offset, SeekOrigin.Begin);
                file.ReadExactly(data);
                return data;
            }

            public void CopyTo(Stream destination)
            {
                using var file = new FileStream(Path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 20);
                file.Seek(Offset, SeekOrigin.Begin);
                var buffer = new byte[1 << 20];
                long remaining = Length;
                while (remaining > 0)
                {
                    int read = file.Read(buffer, 0, (int)Math.Min(buffer.Length, remaining));
                    if (read == 0)
                    {
                        throw new EndOfStreamException($"{Path}: tensor {Name} is truncated");
                    }
                    destination.Write(buffer, 0, read);
                    remaining -= read;
                }
            }
        }

        private SafeTensorsIndex()
            : base(StringComparer.Ordinal)
        {
        }

        public static SafeTensorsIndex Open(string directory)
        {
            var index = new SafeTensorsIndex();
            Span<byte> length = stackalloc byte[8];
            foreach (string path in Directory.GetFiles(directory, "*.safetensors").Order(StringComparer.Ordinal))
            {
                using var file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read);
                file.ReadExactly(length);
                long headerLength = (long)BinaryPrimitives.ReadUInt64LittleEndian(length);
                var header = new byte[headerLength];
                file.ReadExactly(header);
                long dataStart = 8 + headerLength;
                using var json = JsonDocument.Parse(Encoding.UTF8.GetString(header));
                foreach (var tensor in json.RootElement.EnumerateObject())
                {
                    if (tensor.Name == "__metadata__")
                    {
                        continue;
                    }
                    var offsets = tensor.Value.GetProperty("data_offsets");
                    long begin = offsets[0].GetInt64();
                    long end = offsets[1].GetInt64();
                    index.Add(tensor.Name, new Entry(tensor.Name, tensor.Value.GetProperty("dtype").GetString()!,
                        tensor.Value.GetProperty("shape").EnumerateArray().Select(d => d.GetInt32()).ToArray(), path, dataStart + begin, end - begin));
                }
            }
            if (index.Count == 0)
            {
                throw new FileNotFoundException($"no *.safetensors files in {directory}");
            }
            return index;
        }
    }
}

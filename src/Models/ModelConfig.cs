using System.Text.Json;
using KernelLM.Runtime;

namespace KernelLM.Models;

public enum Architecture
{
    Llama,
    Mistral,
    Qwen2,
}

/// <summary>RoPE frequency scaling from config.json's rope_scaling: none, "linear" or "llama3".</summary>
public sealed record RopeScaling(string Type, double Factor, double LowFrequencyFactor, double HighFrequencyFactor, int OriginalMaxPositions);

/// <summary>
/// The fields of a Hugging Face config.json that decide the maths of a Llama-family decoder. Parsed with
/// the defaults of the matching transformers config class; any field that would change the maths in a way
/// KernelLM does not implement is refused with an error naming it.
/// </summary>
public sealed record ModelConfig
{
    public required Architecture Architecture { get; init; }
    public required string ArchitectureName { get; init; }
    public required int VocabularySize { get; init; }
    public required int HiddenSize { get; init; }
    public required int IntermediateSize { get; init; }
    public required int Layers { get; init; }
    public required int Heads { get; init; }
    public required int KvHeads { get; init; }
    public required int HeadDim { get; init; }
    public required double RmsNormEpsilon { get; init; }
    public required double RopeTheta { get; init; }
    public RopeScaling? RopeScaling { get; init; }
    public required int MaxPositionEmbeddings { get; init; }
    public required bool TieWordEmbeddings { get; init; }

    /// <summary>Biases on q, k and v projections (Qwen2 always; Llama with attention_bias).</summary>
    public required bool QkvBias { get; init; }

    /// <summary>Bias on the output projection (Llama with attention_bias).</summary>
    public required bool OutputBias { get; init; }

    /// <summary>Mistral's sliding window: position p attends to keys (p - window, p]. 0 = none.</summary>
    public required int SlidingWindow { get; init; }

    public int? BosTokenId { get; init; }
    public required IReadOnlyList<int> EosTokenIds { get; init; }
    public string? TorchDtype { get; init; }

    public int KvGroupSize => Heads / KvHeads;

    public static ModelConfig Load(string directory)
    {
        string path = Path.Combine(directory, "config.json");
        if (!File.Exists(path))
        {
            throw new ModelConfigException($"config.json not found in model folder {directory}");
        }
        ModelConfig config;
        try
        {
            using var document = JsonDocument.Parse(File.ReadAllBytes(path));
            config = Parse(document.RootElement, path);
        }
        catch (JsonException error)
        {
            throw new ModelConfigException($"{path}: not valid JSON: {error.Message}", error);
        }
        string generationPath = Path.Combine(directory, "generation_config.json");
        if (File.Exists(generationPath))
        {
            try
            {
                using var document = JsonDocument.Parse(File.ReadAllBytes(generationPath));
                var extra = ReadIdList(document.RootElement, "eos_token_id", generationPath);
                if (extra.Count > 0)
                {
                    config = config with { EosTokenIds = config.EosTokenIds.Concat(extra).Distinct().ToArray() };
                }
            }
            catch (JsonException error)
            {
                throw new ModelConfigException($"{generationPath}: not valid JSON: {error.Message}", error);
            }
        }
        return config;
    }

    public static ModelConfig Parse(JsonElement root, string path = "config.json")
    {
        if (root.ValueKind != JsonValueKind.Object)
        {
            throw new ModelConfigException($"{path}: expected a JSON object");
        }
        string architectureName = ReadArchitecture(root, path);
        var architecture = architectureName switch
        {
            "LlamaForCausalLM" => Architecture.Llama,
            "MistralForCausalLM" => Architecture.Mistral,
            "Qwen2ForCausalLM" => Architecture.Qwen2,
            _ => throw new ModelConfigException(
                $"{path}: architecture '{architectureName}' is not supported (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM are)"),
        };

        int hidden = RequiredInt(root, "hidden_size", path);
        int heads = RequiredInt(root, "num_attention_heads", path);
        int kvHeads = OptionalInt(root, "num_key_value_heads", path) ?? heads;
        int headDim = OptionalInt(root, "head_dim", path) ?? (heads > 0 ? hidden / heads : 0);
        int vocabulary = RequiredInt(root, "vocab_size", path);
        int intermediate = RequiredInt(root, "intermediate_size", path);
        int layers = RequiredInt(root, "num_hidden_layers", path);
        foreach (var (name, value) in new[] { ("hidden_size", hidden), ("num_attention_heads", heads), ("num_key_value_heads", kvHeads),
                     ("head_dim", headDim), ("vocab_size", vocabulary), ("intermediate_size", intermediate), ("num_hidden_layers", layers) })
        {
            if (value <= 0)
            {
                throw new ModelConfigException($"{path}: field '{name}' must be positive, got {value}");
            }
        }
        if (heads % kvHeads != 0)
        {
            throw new ModelConfigException($"{path}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kvHeads})");
        }
        if (headDim % 2 != 0)
        {
            throw new ModelConfigException($"{path}: head_dim ({headDim}) must be even for RoPE");
        }

        string activation = OptionalString(root, "hidden_act", path) ?? "silu";
        if (activation != "silu")
        {
            throw new ModelConfigException($"{path}: hidden_act '{activation}' is not supported (silu is)");
        }
        if (OptionalBool(root, "mlp_bias", path) == true)
        {
            throw new ModelConfigException($"{path}: mlp_bias=true is not supported");
        }
        if (root.TryGetProperty("quantization_config", out var quantization) && quantization.ValueKind != JsonValueKind.Null)
        {
            throw new ModelConfigException($"{path}: quantized checkpoints (quantization_config) are not supported; use F32/F16/BF16 weights");
        }

        bool attentionBias = OptionalBool(root, "attention_bias", path) ?? false;
        int slidingWindow = 0;
        switch (architecture)
        {
            case Architecture.Mistral:
                // MistralConfig's default window is 4096; an explicit null disables it (Mistral v0.2+).
                slidingWindow = root.TryGetProperty("sliding_window", out var window)
                    ? window.ValueKind == JsonValueKind.Null ? 0 : RequiredInt(root, "sliding_window", path)
                    : 4096;
                break;
            case Architecture.Qwen2:
                if (OptionalBool(root, "use_sliding_window", path) == true)
                {
                    throw new ModelConfigException($"{path}: use_sliding_window=true (Qwen2 per-layer sliding window) is not supported");
                }
                break;
        }

        var eos = ReadIdList(root, "eos_token_id", path);
        return new ModelConfig
        {
            Architecture = architecture,
            ArchitectureName = architectureName,
            VocabularySize = vocabulary,
            HiddenSize = hidden,
            IntermediateSize = intermediate,
            Layers = layers,
            Heads = heads,
            KvHeads = kvHeads,
            HeadDim = headDim,
            RmsNormEpsilon = OptionalDouble(root, "rms_norm_eps", path) ?? 1e-6,
            RopeTheta = OptionalDouble(root, "rope_theta", path) ?? 10000.0,
            RopeScaling = ReadRopeScaling(root, path),
            MaxPositionEmbeddings = OptionalInt(root, "max_position_embeddings", path) ?? 2048,
            TieWordEmbeddings = OptionalBool(root, "tie_word_embeddings", path) ?? false,
            QkvBias = architecture == Architecture.Qwen2 || attentionBias,
            OutputBias = architecture == Architecture.Llama && attentionBias,
            SlidingWindow = slidingWindow,
            BosTokenId = OptionalInt(root, "bos_token_id", path),
            EosTokenIds = eos,
            TorchDtype = OptionalString(root, "torch_dtype", path) ?? OptionalString(root, "dtype", path),
        };
    }

    private static string ReadArchitecture(JsonElement root, string path)
    {
        if (root.TryGetProperty("architectures", out var list) && list.ValueKind == JsonValueKind.Array && list.GetArrayLength() > 0)
        {
            if (list.GetArrayLength() > 1)
            {
                throw new ModelConfigException($"{path}: 'architectures' lists {list.GetArrayLength()} entries; expected one");
            }
            // GetString throws an untyped InvalidOperationException on a non-string, so the kind is checked first.
            return list[0].ValueKind == JsonValueKind.String
                ? list[0].GetString()!
                : throw new ModelConfigException($"{path}: 'architectures' must hold strings, got {list[0].GetRawText()}");
        }
        return OptionalString(root, "model_type", path) switch
        {
            "llama" => "LlamaForCausalLM",
            "mistral" => "MistralForCausalLM",
            "qwen2" => "Qwen2ForCausalLM",
            null => throw new ModelConfigException($"{path}: neither 'architectures' nor 'model_type' says which model this is"),
            var other => other,
        };
    }

    private static RopeScaling? ReadRopeScaling(JsonElement root, string path)
    {
        if (!root.TryGetProperty("rope_scaling", out var scaling) || scaling.ValueKind == JsonValueKind.Null)
        {
            return null;
        }
        if (scaling.ValueKind != JsonValueKind.Object)
        {
            throw new ModelConfigException($"{path}: field 'rope_scaling' must be an object or null");
        }
        string where = path + " rope_scaling";
        string type = OptionalString(scaling, "rope_type", where) ?? OptionalString(scaling, "type", where)
            ?? throw new ModelConfigException($"{path}: rope_scaling has no 'rope_type'");
        switch (type)
        {
            case "default":
                return null;
            case "linear":
                return new RopeScaling(type, RequiredDouble(scaling, "factor", where), 0, 0, 0);
            case "llama3":
                double low = RequiredDouble(scaling, "low_freq_factor", where);
                double high = RequiredDouble(scaling, "high_freq_factor", where);
                if (high <= low)
                {
                    throw new ModelConfigException($"{path}: rope_scaling high_freq_factor ({high}) must exceed low_freq_factor ({low})");
                }
                return new RopeScaling(type, RequiredDouble(scaling, "factor", where), low, high,
                    RequiredInt(scaling, "original_max_position_embeddings", where));
            default:
                throw new ModelConfigException($"{path}: rope_scaling type '{type}' is not supported (linear and llama3 are)");
        }
    }

    private static List<int> ReadIdList(JsonElement root, string name, string path)
    {
        var ids = new List<int>();
        if (!root.TryGetProperty(name, out var value) || value.ValueKind == JsonValueKind.Null)
        {
            return ids;
        }
        if (value.ValueKind == JsonValueKind.Number && value.TryGetInt32(out int single))
        {
            ids.Add(single);
            return ids;
        }
        if (value.ValueKind == JsonValueKind.Array)
        {
            foreach (var item in value.EnumerateArray())
            {
                if (item.ValueKind != JsonValueKind.Number || !item.TryGetInt32(out int id))
                {
                    throw new ModelConfigException($"{path}: field '{name}' must be an integer or a list of integers");
                }
                ids.Add(id);
            }
            return ids;
        }
        throw new ModelConfigException($"{path}: field '{name}' must be an integer or a list of integers");
    }

    private static int RequiredInt(JsonElement root, string name, string path) =>
        OptionalInt(root, name, path) ?? throw new ModelConfigException($"{path}: required field '{name}' is missing");

    private static double RequiredDouble(JsonElement root, string name, string path) =>
        OptionalDouble(root, name, path) ?? throw new ModelConfigException($"{path}: required field '{name}' is missing");

    private static int? OptionalInt(JsonElement root, string name, string path)
    {
        if (!root.TryGetProperty(name, out var value) || value.ValueKind == JsonValueKind.Null)
        {
            return null;
        }
        return value.ValueKind == JsonValueKind.Number && value.TryGetInt32(out int result)
            ? result
            : throw new ModelConfigException($"{path}: field '{name}' must be an integer, got {value.GetRawText()}");
    }

    private static double? OptionalDouble(JsonElement root, string name, string path)
    {
        if (!root.TryGetProperty(name, out var value) || value.ValueKind == JsonValueKind.Null)
        {
            return null;
        }
        return value.ValueKind == JsonValueKind.Number && value.TryGetDouble(out double result) && double.IsFinite(result)
            ? result
            : throw new ModelConfigException($"{path}: field '{name}' must be a number, got {value.GetRawText()}");
    }

    private static bool? OptionalBool(JsonElement root, string name, string path)
    {
        if (!root.TryGetProperty(name, out var value) || value.ValueKind == JsonValueKind.Null)
        {
            return null;
        }
        return value.ValueKind switch
        {
            JsonValueKind.True => true,
            JsonValueKind.False => false,
            _ => throw new ModelConfigException($"{path}: field '{name}' must be true or false, got {value.GetRawText()}"),
        };
    }

    private static string? OptionalString(JsonElement root, string name, string path)
    {
        if (!root.TryGetProperty(name, out var value) || value.ValueKind == JsonValueKind.Null)
        {
            return null;
        }
        return value.ValueKind == JsonValueKind.String
            ? value.GetString()
            : throw new ModelConfigException($"{path}: field '{name}' must be a string, got {value.GetRawText()}");
    }
}

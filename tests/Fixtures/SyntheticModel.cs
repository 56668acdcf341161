using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using KernelLM.Models;
using KernelLM.Runtime;
using KernelLM.Tests.Support;
using NUnit.Framework;

namespace KernelLM.Tests.Fixtures;

/// <summary>What a synthetic model folder looks like; every combination the loader distinguishes is a field.</summary>
public sealed record SyntheticModelSpec
{
    public Architecture Architecture { get; init; } = Architecture.Llama;

    /// <summary>Must stay 2048: the tiny-stories tokenizer.json is copied in.</summary>
    public int VocabularySize { get; init; } = 2048;
    public int HiddenSize { get; init; } = 64;
    public int IntermediateSize { get; init; } = 160;
    public int Layers { get; init; } = 2;
    public int Heads { get; init; } = 4;
    public int KvHeads { get; init; } = 2;

    /// <summary>Written to config.json only when set; otherwise hidden / heads.</summary>
    public int? HeadDim { get; init; }
    public bool TieWordEmbeddings { get; init; }

    /// <summary>F32, F16 or BF16 for every tensor.</summary>
    public DType DType { get; init; } = DType.BF16;

    /// <summary>Llama attention_bias: q, k, v and o biases.</summary>
    public bool AttentionBias { get; init; }

    /// <summary>rope_scaling {llama3, factor 8, low 1, high 4, original 64}.</summary>
    public bool Llama3RopeScaling { get; init; }

    /// <summary>Mistral only; null writes "sliding_window": null.</summary>
    public int? SlidingWindow { get; init; }
    public double RopeTheta { get; init; } = 10000;
    public int MaxPositionEmbeddings { get; init; } = 512;

    /// <summary>Two shards plus model.safetensors.index.json.</summary>
    public bool Sharded { get; init; }
    public int Seed { get; init; } = 1;

    public int ResolvedHeadDim => HeadDim ?? HiddenSize / Heads;
}

/// <summary>
/// Writes seeded random Llama / Mistral / Qwen2 folders (config.json, safetensors, tokenizer) that the engine
/// loads. The weights are scaled so that activations stay O(1) through the layers and the logits come out
/// O(1..10) and distinct, which is what a forward-pass test needs to tell a broken kernel from a working one.
/// </summary>
public static class SyntheticModel
{
    public static string Write(string directory, SyntheticModelSpec spec) => Write(directory, spec, tensors => tensors);

    /// <summary>
    /// As <see cref="Write(string, SyntheticModelSpec)"/>, with <paramref name="editTensors"/> given the tensor
    /// list before it is stored, so a test can drop, reshape or add a tensor against an otherwise valid model.
    /// </summary>
    public static string Write(string directory, SyntheticModelSpec spec,
        Func<IReadOnlyList<(string Name, DType DType, int[] Shape, byte[] Data)>, IReadOnlyList<(string Name, DType DType, int[] Shape, byte[] Data)>> editTensors)
    {
        ArgumentNullException.ThrowIfNull(spec);
        ArgumentNullException.ThrowIfNull(editTensors);
        Directory.CreateDirectory(directory);
        File.WriteAllText(Path.Combine(directory, "config.json"), Config(spec).ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        File.Copy(Path.Combine(TestPaths.TinyStories, "tokenizer.json"), Path.Combine(directory, "tokenizer.json"), overwrite: true);
        File.Copy(Path.Combine(TestPaths.TinyStories, "tokenizer_config.json"), Path.Combine(directory, "tokenizer_config.json"), overwrite: true);

        var tensors = editTensors(Tensors(spec));
        if (!spec.Sharded)
        {
            SafeTensorsWriter.Write(Path.Combine(directory, "model.safetensors"), tensors);
            return directory;
        }

        // Split at the middle of the list so that both shards hold layer tensors and the index matters.
        int split = tensors.Count / 2;
        string[] shardNames = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
        var shards = new[] { tensors.Take(split).ToList(), tensors.Skip(split).ToList() };
        var weightMap = new JsonObject();
        for (int shard = 0; shard < shards.Length; shard++)
        {
            SafeTensorsWriter.Write(Path.Combine(directory, shardNames[shard]), shards[shard]);
            foreach (var tensor in shards[shard])
            {
                weightMap[tensor.Name] = shardNames[shard];
            }
        }
        var index = new JsonObject
        {
            ["metadata"] = new JsonObject { ["total_size"] = tensors.Sum(tensor => (long)tensor.Data.Length) },
            ["weight_map"] = weightMap,
        };
        File.WriteAllText(Path.Combine(directory, "model.safetensors.index.json"), index.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        return directory;
    }

    /// <summary>config.json as transformers' save_pretrained would write it for <paramref name="spec"/>.</summary>
    public static JsonObject Config(SyntheticModelSpec spec)
    {
        ArgumentNullException.ThrowIfNull(spec);
        var (architectureName, modelType) = spec.Architecture switch
        {
            Architecture.Llama => ("LlamaForCausalLM", "llama"),
            Architecture.Mistral => ("MistralForCausalLM", "mistral"),
            Architecture.Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
            _ => throw new ArgumentOutOfRangeException(nameof(spec), spec.Architecture, "unknown architecture"),
        };
        var config = new JsonObject
        {
            ["architectures"] = new JsonArray(architectureName),
            ["model_type"] = modelType,
            ["vocab_size"] = spec.VocabularySize,
            ["hidden_size"] = spec.HiddenSize,
            ["intermediate_size"] = spec.IntermediateSize,
            ["num_hidden_layers"] = spec.Layers,
            ["num_attention_heads"] = spec.Heads,
            ["num_key_value_heads"] = spec.KvHeads,
            ["hidden_act"] = "silu",
            ["rms_norm_eps"] = 1e-5,
            ["rope_theta"] = spec.RopeTheta,
            ["max_position_embeddings"] = spec.MaxPositionEmbeddings,
            ["tie_word_embeddings"] = spec.TieWordEmbeddings,
            ["bos_token_id"] = 0,
            ["eos_token_id"] = 1,
            ["initializer_range"] = 0.02,
            ["use_cache"] = true,
            ["torch_dtype"] = spec.DType switch
            {
                DType.F32 => "float32",
                DType.F16 => "float16",
                DType.BF16 => "bfloat16",
                _ => throw new ArgumentOutOfRangeException(nameof(spec), spec.DType, "synthetic models are F32, F16 or BF16"),
            },
        };
        if (spec.HeadDim is int headDim)
        {
            config["head_dim"] = headDim;
        }
        switch (spec.Architecture)
        {
            case Architecture.Llama:
                config["attention_bias"] = spec.AttentionBias;
                config["mlp_bias"] = false;
                config["rope_scaling"] = spec.Llama3RopeScaling
                    ? new JsonObject
                    {
                        ["rope_type"] = "llama3",
                        ["factor"] = 8.0,
                        ["low_freq_factor"] = 1.0,
                        ["high_freq_factor"] = 4.0,
                        ["original_max_position_embeddings"] = 64,
                    }
                    : null;
                break;
            case Architecture.Mistral:
                config["sliding_window"] = spec.SlidingWindow;
                break;
            case Architecture.Qwen2:
                config["use_sliding_window"] = false;
                break;
        }
        return config;
    }

    /// <summary>Every tensor of the model in HF order and naming, seeded by <see cref="SyntheticModelSpec.Seed"/>.</summary>
    public static IReadOnlyList<(string Name, DType DType, int[] Shape, byte[] Data)> Tensors(SyntheticModelSpec spec)
    {
        ArgumentNullException.ThrowIfNull(spec);
        var random = new Random(spec.Seed);
        var tensors = new List<(string Name, DType DType, int[] Shape, byte[] Data)>();
        int hidden = spec.HiddenSize;
        int intermediate = spec.IntermediateSize;
        int headDim = spec.ResolvedHeadDim;
        int queryWidth = spec.Heads * headDim;
        int kvWidth = spec.KvHeads * headDim;
        bool qkvBias = spec.Architecture == Architecture.Qwen2 || (spec.Architecture == Architecture.Llama && spec.AttentionBias);
        bool outputBias = spec.Architecture == Architecture.Llama && spec.AttentionBias;

        void Add(string name, int[] shape, Func<float> sample)
        {
            var values = new float[shape.Aggregate(1, (product, dimension) => product * dimension)];
            for (int i = 0; i < values.Length; i++)
            {
                values[i] = sample();
            }
            tensors.Add((name, spec.DType, shape, SafeTensorsWriter.Encode(spec.DType, values)));
        }
        // After RMSNorm the hidden state has unit RMS, so a head row with std 2/sqrt(hidden) gives logits of std ~2:
        // O(1..10) and far from all-equal. Projections use std 1/sqrt(fan_in) so activations keep unit scale.
        Func<float> Normal(double std) => () => (float)(std * Gaussian(random));
        Func<float> Norm() => () => (float)(1.0 + 0.1 * Gaussian(random));
        Func<float> Bias() => () => (float)(0.05 + 0.1 * Gaussian(random));

        Add("model.embed_tokens.weight", [spec.VocabularySize, hidden], Normal(2 / Math.Sqrt(hidden)));
        for (int layer = 0; layer < spec.Layers; layer++)
        {
            string prefix = string.Create(CultureInfo.InvariantCulture, $"model.layers.{layer}.");
            Add(prefix + "input_layernorm.weight", [hidden], Norm());
            Add(prefix + "self_attn.q_proj.weight", [queryWidth, hidden], Normal(1 / Math.Sqrt(hidden)));
            if (qkvBias)
            {
                Add(prefix + "self_attn.q_proj.bias", [queryWidth], Bias());
            }
            Add(prefix + "self_attn.k_proj.weight", [kvWidth, hidden], Normal(1 / Math.Sqrt(hidden)));
            if (qkvBias)
            {
                Add(prefix + "self_attn.k_proj.bias", [kvWidth], Bias());
            }
            Add(prefix + "self_attn.v_proj.weight", [kvWidth, hidden], Normal(1 / Math.Sqrt(hidden)));
            if (qkvBias)
            {
                Add(prefix + "self_attn.v_proj.bias", [kvWidth], Bias());
            }
            Add(prefix + "self_attn.o_proj.weight", [hidden, queryWidth], Normal(0.5 / Math.Sqrt(queryWidth)));
            if (outputBias)
            {
                Add(prefix + "self_attn.o_proj.bias", [hidden], Bias());
            }
            Add(prefix + "post_attention_layernorm.weight", [hidden], Norm());
            Add(prefix + "mlp.gate_proj.weight", [intermediate, hidden], Normal(1 / Math.Sqrt(hidden)));
            Add(prefix + "mlp.up_proj.weight", [intermediate, hidden], Normal(1 / Math.Sqrt(hidden)));
            Add(prefix + "mlp.down_proj.weight", [hidden, intermediate], Normal(0.5 / Math.Sqrt(intermediate)));
        }
        Add("model.norm.weight", [hidden], Norm());
        if (!spec.TieWordEmbeddings)
        {
            Add("lm_head.weight", [spec.VocabularySize, hidden], Normal(2 / Math.Sqrt(hidden)));
        }
        return tensors;
    }

    /// <summary>Box-Muller; System.Random has no normal sampler and the stream must be reproducible per seed.</summary>
    private static double Gaussian(Random random)
    {
        double uniform1 = 1.0 - random.NextDouble();
        double uniform2 = random.NextDouble();
        return Math.Sqrt(-2.0 * Math.Log(uniform1)) * Math.Cos(2.0 * Math.PI * uniform2);
    }
}

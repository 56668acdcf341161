using KernelLM.Runtime;
using KernelLM.Runtime.SafeTensors;

namespace KernelLM.Models.Llama;

/// <summary>What a tensor is for in the decoder.</summary>
public enum WeightRole
{
    Embedding,
    FinalNorm,
    LmHead,
    AttentionNorm,
    Query,
    Key,
    Value,
    Output,
    QueryBias,
    KeyBias,
    ValueBias,
    OutputBias,
    MlpNorm,
    Gate,
    Up,
    Down,
}

/// <summary>One row of the weight map: HF tensor name ({0} = layer index), role, expected shape.</summary>
public sealed record WeightEntry(string NamePattern, WeightRole Role, bool PerLayer, Func<ModelConfig, int[]> Shape, Func<ModelConfig, bool> Present)
{
    public string NameFor(int layer) => PerLayer ? string.Format(System.Globalization.CultureInfo.InvariantCulture, NamePattern, layer) : NamePattern;
}

/// <summary>
/// The HF → KernelLM weight map of Llama, Mistral and Qwen2 as a table. Shapes are PyTorch's (nn.Linear:
/// [out_features, in_features]); HF checkpoints store q/k in the rotate-half layout, so no permutation.
/// </summary>
public static class WeightMap
{
    private static int QueryWidth(ModelConfig c) => c.Heads * c.HeadDim;
    private static int KvWidth(ModelConfig c) => c.KvHeads * c.HeadDim;

    public static IReadOnlyList<WeightEntry> Entries { get; } =
    [
        new("model.embed_tokens.weight", WeightRole.Embedding, false, c => [c.VocabularySize, c.HiddenSize], _ => true),
        new("model.norm.weight", WeightRole.FinalNorm, false, c => [c.HiddenSize], _ => true),
        new("lm_head.weight", WeightRole.LmHead, false, c => [c.VocabularySize, c.HiddenSize], c => !c.TieWordEmbeddings),
        new("model.layers.{0}.input_layernorm.weight", WeightRole.AttentionNorm, true, c => [c.HiddenSize], _ => true),
        new("model.layers.{0}.self_attn.q_proj.weight", WeightRole.Query, true, c => [QueryWidth(c), c.HiddenSize], _ => true),
        new("model.layers.{0}.self_attn.k_proj.weight", WeightRole.Key, true, c => [KvWidth(c), c.HiddenSize], _ => true),
        new("model.layers.{0}.self_attn.v_proj.weight", WeightRole.Value, true, c => [KvWidth(c), c.HiddenSize], _ => true),
        new("model.layers.{0}.self_attn.o_proj.weight", WeightRole.Output, true, c => [c.HiddenSize, QueryWidth(c)], _ => true),
        new("model.layers.{0}.self_attn.q_proj.bias", WeightRole.QueryBias, true, c => [QueryWidth(c)], c => c.QkvBias),
        new("model.layers.{0}.self_attn.k_proj.bias", WeightRole.KeyBias, true, c => [KvWidth(c)], c => c.QkvBias),
        new("model.layers.{0}.self_attn.v_proj.bias", WeightRole.ValueBias, true, c => [KvWidth(c)], c => c.QkvBias),
        new("model.layers.{0}.self_attn.o_proj.bias", WeightRole.OutputBias, true, c => [c.HiddenSize], c => c.OutputBias),
        new("model.layers.{0}.post_attention_layernorm.weight", WeightRole.MlpNorm, true, c => [c.HiddenSize], _ => true),
        new("model.layers.{0}.mlp.gate_proj.weight", WeightRole.Gate, true, c => [c.IntermediateSize, c.HiddenSize], _ => true),
        new("model.layers.{0}.mlp.up_proj.weight", WeightRole.Up, true, c => [c.IntermediateSize, c.HiddenSize], _ => true),
        new("model.layers.{0}.mlp.down_proj.weight", WeightRole.Down, true, c => [c.HiddenSize, c.IntermediateSize], _ => true),
    ];

    /// <summary>Tensors some checkpoints carry that the maths does not use (recomputed RoPE tables).</summary>
    private static bool IsIgnorable(string name) => name.EndsWith(".rotary_emb.inv_freq", StringComparison.Ordinal);

    /// <summary>
    /// Resolves every entry the config calls for, checking presence, shape and dtype; refuses tensors the map
    /// does not know (they would mean maths KernelLM does not implement). Returns (role, layer) → tensor.
    /// </summary>
    public static Dictionary<(WeightRole Role, int Layer), TensorView> Resolve(ModelConfig config, SafeTensorsArchive archive, string directory)
    {
        var resolved = new Dictionary<(WeightRole, int), TensorView>();
        var used = new HashSet<string>(StringComparer.Ordinal);
        foreach (var entry in Entries)
        {
            int layers = entry.PerLayer ? config.Layers : 1;
            for (int layer = 0; layer < layers; layer++)
            {
                string name = entry.NameFor(layer);
                bool present = archive.TryGetTensor(name, out var tensor);
                if (entry.Role == WeightRole.LmHead && config.TieWordEmbeddings)
                {
                    // Tied: the head is the embedding; a stored copy is accepted and used if present.
                    if (!present)
                    {
                        continue;
                    }
                }
                else if (!entry.Present(config))
                {
                    continue;
                }
                if (!present)
                {
                    throw new ModelConfigException($"{directory}: tensor '{name}' ({entry.Role}, shape [{string.Join(", ", entry.Shape(config))}]) is missing from the safetensors files");
                }
                int[] expected = entry.Shape(config);
                if (!tensor.Shape.AsSpan().SequenceEqual(expected))
                {
                    throw new ModelConfigException($"{directory}: tensor '{name}' has shape {tensor.ShapeText}, config.json implies [{string.Join(", ", expected)}]");
                }
                if (!tensor.DType.IsSupported())
                {
                    throw new SafeTensorsException(directory, name, SafeTensorsError.UnsupportedDType,
                        $"dtype {tensor.DType.ToSafeTensorsName()} is not supported (F32, F16, BF16 are)");
                }
                used.Add(name);
                resolved[(entry.Role, entry.PerLayer ? layer : 0)] = tensor;
            }
        }
        var unexpected = archive.Tensors.Keys.Where(name => !used.Contains(name) && !IsIgnorable(name)).Order(StringComparer.Ordinal).ToList();
        if (unexpected.Count > 0)
        {
            throw new ModelConfigException(
                $"{directory}: {unexpected.Count} tensor(s) that config.json does not call for, e.g. '{string.Join("', '", unexpected.Take(3))}' " +
                "(biases or layers this architecture does not have: the config and the weights disagree)");
        }
        return resolved;
    }
}

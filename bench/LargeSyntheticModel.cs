using System.Buffers.Binary;
using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using KernelLM.Runtime;

namespace KernelLM.Bench;

/// <summary>
/// A model folder with the exact shapes of Llama-3.2-1B (hidden 2048, intermediate 8192, 16 layers, 32 heads,
/// 8 KV heads, head_dim 64, vocabulary 128256, tied head, llama3 RoPE) and seeded random weights, in BF16 or
/// F32: 1.24 B parameters, 2.47 GB or 4.94 GB of safetensors. Speed does not depend on the values, so the
/// weights are uniform with the scales of tests/Fixtures/SyntheticModel (activations stay O(1)). Written once,
/// streamed in slices (never whole in memory), and reused while its stamp file matches.
/// </summary>
public static class LargeSyntheticModel
{
    public const int Vocabulary = 128256;
    public const int Hidden = 2048;
    public const int Intermediate = 8192;
    public const int Layers = 16;
    public const int Heads = 32;
    public const int KvHeads = 8;
    public const int HeadDim = 64;

    /// <summary>Bump when the contents change, so cached folders are rewritten.</summary>
    private const int FormatVersion = 1;

    public static string Ensure(string root, DType dtype)
    {
        string directory = Path.Combine(root, $"llama-3.2-1b-shape-{dtype.ToSafeTensorsName().ToLowerInvariant()}");
        string stamp = Path.Combine(directory, "race-model.json");
        string expected = $"{{\"version\": {FormatVersion}, \"dtype\": \"{dtype.ToSafeTensorsName()}\"}}";
        if (File.Exists(stamp) && File.ReadAllText(stamp) == expected && File.Exists(Path.Combine(directory, "model.safetensors")))
        {
            return directory;
        }
        Directory.CreateDirectory(directory);
        File.Delete(stamp);
        File.WriteAllText(Path.Combine(directory, "config.json"), Config(dtype).ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        WriteSafeTensors(Path.Combine(directory, "model.safetensors"), dtype);
        File.WriteAllText(stamp, expected);
        return directory;
    }

    private static JsonObject Config(DType dtype) => new()
    {
        ["architectures"] = new JsonArray("LlamaForCausalLM"),
        ["model_type"] = "llama",
        ["vocab_size"] = Vocabulary,
        ["hidden_size"] = Hidden,
        ["intermediate_size"] = Intermediate,
        ["num_hidden_layers"] = Layers,
        ["num_attention_heads"] = Heads,
        ["num_key_value_heads"] = KvHeads,
        ["head_dim"] = HeadDim,
        ["hidden_act"] = "silu",
        ["rms_norm_eps"] = 1e-5,
        ["rope_theta"] = 500000.0,
        ["rope_scaling"] = new JsonObject
        {
            ["rope_type"] = "llama3",
            ["factor"] = 32.0,
            ["low_freq_factor"] = 1.0,
            ["high_freq_factor"] = 4.0,
            ["original_max_position_embeddings"] = 8192,
        },
        ["max_position_embeddings"] = 131072,
        ["tie_word_embeddings"] = true,
        ["attention_bias"] = false,
        ["mlp_bias"] = false,
        ["bos_token_id"] = 128000,
        ["eos_token_id"] = 128001,
        ["torch_dtype"] = dtype == DType.BF16 ? "bfloat16" : "float32",
    };

    /// <summary>name, shape, and the uniform distribution's centre and standard deviation.</summary>
    private static List<(string Name, int[] Shape, double Centre, double Std)> Tensors()
    {
        var tensors = new List<(string, int[], double, double)>
        {
            ("model.embed_tokens.weight", [Vocabulary, Hidden], 0, 2 / Math.Sqrt(Hidden)),
        };
        for (int layer = 0; layer < Layers; layer++)
        {
            string prefix = string.Create(CultureInfo.InvariantCulture, $"model.layers.{layer}.");
            tensors.Add((prefix + "input_layernorm.weight", [Hidden], 1, 0.1));
            tensors.Add((prefix + "self_attn.q_proj.weight", [Heads * HeadDim, Hidden], 0, 1 / Math.Sqrt(Hidden)));
            tensors.Add((prefix + "self_attn.k_proj.weight", [KvHeads * HeadDim, Hidden], 0, 1 / Math.Sqrt(Hidden)));
            tensors.Add((prefix + "self_attn.v_proj.weight", [KvHeads * HeadDim, Hidden], 0, 1 / Math.Sqrt(Hidden)));
            tensors.Add((prefix + "self_attn.o_proj.weight", [Hidden, Heads * HeadDim], 0, 0.5 / Math.Sqrt(Heads * HeadDim)));
            tensors.Add((prefix + "post_attention_layernorm.weight", [Hidden], 1, 0.1));
            tensors.Add((prefix + "mlp.gate_proj.weight", [Intermediate, Hidden], 0, 1 / Math.Sqrt(Hidden)));
            tensors.Add((prefix + "mlp.up_proj.weight", [Intermediate, Hidden], 0, 1 / Math.Sqrt(Hidden)));
            tensors.Add((prefix + "mlp.down_proj.weight", [Hidden, Intermediate], 0, 0.5 / Math.Sqrt(Intermediate)));
        }
        tensors.Add(("model.norm.weight", [Hidden], 1, 0.1));
        return tensors;
    }

    private static void WriteSafeTensors(string path, DType dtype)
    {
        var tensors = Tensors();
        int elementSize = dtype.SizeOf();
        string headerJson = KernelLM.Tests.Fixtures.SafeTensorsWriter.Header(tensors
            .Select(t => (t.Name, dtype, t.Shape, t.Shape.Aggregate(1L, (product, dimension) => product * dimension) * elementSize))
            .ToList());
        byte[] headerBytes = System.Text.Encoding.UTF8.GetBytes(headerJson);
        int padded = (headerBytes.Length + 7) / 8 * 8;

        string partial = path + ".partial";
        using (var file = new FileStream(partial, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 22))
        {
            Span<byte> length = stackalloc byte[8];
            BinaryPrimitives.WriteUInt64LittleEndian(length, (ulong)padded);
            file.Write(length);
            file.Write(headerBytes);
            for (int i = headerBytes.Length; i < padded; i++)
            {
                file.WriteByte((byte)' ');
            }
            const int Slice = 1 << 24; // elements generated per write (64 MB of f32)
            const int Chunk = 1 << 18; // elements per independently seeded chunk: same values at any thread count
            var buffer = new byte[(long)Slice * elementSize];
            for (int t = 0; t < tensors.Count; t++)
            {
                var (_, shape, centre, std) = tensors[t];
                long count = shape.Aggregate(1L, (product, dimension) => product * dimension);
                double halfWidth = std * Math.Sqrt(3);
                for (long start = 0; start < count; start += Slice)
                {
                    int sliceCount = (int)Math.Min(Slice, count - start);
                    int tensorIndex = t;
                    long sliceStart = start;
                    Parallel.For(0, (sliceCount + Chunk - 1) / Chunk, chunk =>
                    {
                        long first = sliceStart + (long)chunk * Chunk;
                        ulong state = Mix((ulong)tensorIndex << 40 ^ (ulong)(first / Chunk));
                        int end = Math.Min(sliceCount, (chunk + 1) * Chunk);
                        for (int i = chunk * Chunk; i < end; i++)
                        {
                            state += 0x9E3779B97F4A7C15UL; // splitmix64
                            double uniform = (Mix(state) >> 11) * (1.0 / (1UL << 53));
                            float value = (float)(centre + (2 * uniform - 1) * halfWidth);
                            if (dtype == DType.BF16)
                            {
                                BinaryPrimitives.WriteUInt16LittleEndian(buffer.AsSpan(2 * i), BFloat16.FromSingle(value));
                            }
                            else
                            {
                                BinaryPrimitives.WriteSingleLittleEndian(buffer.AsSpan(4 * i), value);
                            }
                        }
                    });
                    file.Write(buffer, 0, sliceCount * elementSize);
                }
            }
        }
        File.Move(partial, path, overwrite: true);
    }

    private static ulong Mix(ulong x)
    {
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9UL;
        x = (x ^ (x >> 27)) * 0x94D049BB133111EBUL;
        return x ^ (x >> 31);
    }

    /// <summary>Weight bytes as text, for logs.</summary>
    public static string Describe(DType dtype)
    {
        long parameters = Tensors().Sum(t => t.Shape.Aggregate(1L, (p, d) => p * d));
        return string.Create(CultureInfo.InvariantCulture, $"Llama-3.2-1B shapes, {parameters / 1e9:F2} B parameters, {parameters * dtype.SizeOf() / 1e9:F2} GB {dtype.ToSafeTensorsName()}");
    }

    /// <summary>Deterministic token ids below the vocabulary (no tokenizer: both engines take ids).</summary>
    public static int[] TokenIds(int count, int vocabulary, int seed)
    {
        var random = new Random(seed);
        return Enumerable.Range(0, count).Select(_ => random.Next(0, vocabulary)).ToArray();
    }
}

using System.Text.Json;
using System.Text.Json.Nodes;
using KernelLM.Models;
using KernelLM.Models.Llama;
using KernelLM.Runtime;
using KernelLM.Tests.Fixtures;
using KernelLM.Tests.Support;
using NUnit.Framework;

namespace KernelLM.Tests.Models;

[TestFixture]
public sealed class ModelConfigTests
{
    private string _directory = "";

    [SetUp]
    public void CreateDirectory()
    {
        _directory = TestPaths.NewTemporaryDirectory("config");
    }

    [TearDown]
    public void DeleteDirectory() => Directory.Delete(_directory, recursive: true);

    private static ModelConfig Parse(JsonObject config)
    {
        using var document = JsonDocument.Parse(config.ToJsonString());
        return ModelConfig.Parse(document.RootElement, "config.json");
    }

    private static JsonObject ConfigOf(SyntheticModelSpec spec) => SyntheticModel.Config(spec);

    /// <summary>An expected array, spelled inline; a params array keeps CA1861 quiet without a field per assertion.</summary>
    private static T[] Values<T>(params T[] values) => values;

    // ---------------------------------------------------------------- parsing

    [Test]
    public void model_config_parses_tiny_stories()
    {
        var config = ModelConfig.Load(TestPaths.TinyStories);
        using (Assert.EnterMultipleScope())
        {
            Assert.That(config.Architecture, Is.EqualTo(Architecture.Llama));
            Assert.That(config.ArchitectureName, Is.EqualTo("LlamaForCausalLM"));
            Assert.That(config.VocabularySize, Is.EqualTo(2048));
            Assert.That(config.HiddenSize, Is.EqualTo(256));
            Assert.That(config.IntermediateSize, Is.EqualTo(768));
            Assert.That(config.Layers, Is.EqualTo(6));
            Assert.That(config.Heads, Is.EqualTo(8));
            Assert.That(config.KvHeads, Is.EqualTo(4));
            Assert.That(config.KvGroupSize, Is.EqualTo(2));
            Assert.That(config.HeadDim, Is.EqualTo(32));
            Assert.That(config.RmsNormEpsilon, Is.EqualTo(1e-5));
            Assert.That(config.RopeTheta, Is.EqualTo(10000.0));
            Assert.That(config.RopeScaling, Is.Null);
            Assert.That(config.MaxPositionEmbeddings, Is.EqualTo(2048));
            Assert.That(config.TieWordEmbeddings, Is.True);
            Assert.That(config.QkvBias, Is.False);
            Assert.That(config.OutputBias, Is.False);
            Assert.That(config.SlidingWindow, Is.Zero);
            Assert.That(config.BosTokenId, Is.Zero);
            Assert.That(config.EosTokenIds, Is.EqualTo(Values(1)));
            Assert.That(config.TorchDtype, Is.EqualTo("bfloat16"));
        }
    }

    [Test]
    public void model_config_reads_llama3_rope_scaling()
    {
        var config = Parse(ConfigOf(new SyntheticModelSpec { Llama3RopeScaling = true }));
        Assert.That(config.RopeScaling, Is.EqualTo(new RopeScaling("llama3", 8, 1, 4, 64)));
    }

    [Test]
    public void model_config_reads_legacy_linear_rope_scaling_and_treats_default_as_none()
    {
        var linear = ConfigOf(new SyntheticModelSpec());
        // Older configs spell the key "type" instead of "rope_type".
        linear["rope_scaling"] = new JsonObject { ["type"] = "linear", ["factor"] = 4.0 };
        var none = ConfigOf(new SyntheticModelSpec());
        none["rope_scaling"] = new JsonObject { ["rope_type"] = "default" };
        using (Assert.EnterMultipleScope())
        {
            Assert.That(Parse(linear).RopeScaling, Is.EqualTo(new RopeScaling("linear", 4, 0, 0, 0)));
            Assert.That(Parse(none).RopeScaling, Is.Null);
        }
    }

    [Test]
    public void model_config_mistral_sliding_window_defaults_to_4096_and_null_disables_it()
    {
        var absent = ConfigOf(new SyntheticModelSpec { Architecture = Architecture.Mistral });
        absent.Remove("sliding_window");
        var explicitNull = ConfigOf(new SyntheticModelSpec { Architecture = Architecture.Mistral, SlidingWindow = null });
        var sixteen = ConfigOf(new SyntheticModelSpec { Architecture = Architecture.Mistral, SlidingWindow = 16 });
        using (Assert.EnterMultipleScope())
        {
            Assert.That(explicitNull.ContainsKey("sliding_window"), Is.True, "the fixture must write the null explicitly");
            Assert.That(Parse(absent).SlidingWindow, Is.EqualTo(4096));
            Assert.That(Parse(explicitNull).SlidingWindow, Is.Zero);
            Assert.That(Parse(sixteen).SlidingWindow, Is.EqualTo(16));
            Assert.That(Parse(sixteen).Architecture, Is.EqualTo(Architecture.Mistral));
            Assert.That(Parse(ConfigOf(new SyntheticModelSpec())).SlidingWindow, Is.Zero, "Llama has no window");
        }
    }

    [Test]
    public void model_config_bias_flags_follow_the_architecture()
    {
        var qwen = Parse(ConfigOf(new SyntheticModelSpec { Architecture = Architecture.Qwen2 }));
        var llamaWithBias = Parse(ConfigOf(new SyntheticModelSpec { AttentionBias = true }));
        var llama = Parse(ConfigOf(new SyntheticModelSpec()));
        var mistral = Parse(ConfigOf(new SyntheticModelSpec { Architecture = Architecture.Mistral }));
        using (Assert.EnterMultipleScope())
        {
            Assert.That(qwen.Architecture, Is.EqualTo(Architecture.Qwen2));
            Assert.That((qwen.QkvBias, qwen.OutputBias), Is.EqualTo((true, false)), "Qwen2: q, k, v biases, no o bias");
            Assert.That((llamaWithBias.QkvBias, llamaWithBias.OutputBias), Is.EqualTo((true, true)), "Llama attention_bias: all four");
            Assert.That((llama.QkvBias, llama.OutputBias), Is.EqualTo((false, false)));
            Assert.That((mistral.QkvBias, mistral.OutputBias), Is.EqualTo((false, false)));
        }
    }

    [Test]
    public void model_config_defaults_kv_heads_and_head_dim_like_transformers()
    {
        var json = ConfigOf(new SyntheticModelSpec { HeadDim = 32 });
        var withHeadDim = Parse(json);
        json.Remove("head_dim");
        json.Remove("num_key_value_heads");
        var defaults = Parse(json);
        using (Assert.EnterMultipleScope())
        {
            Assert.That(withHeadDim.HeadDim, Is.EqualTo(32));
            Assert.That(defaults.HeadDim, Is.EqualTo(64 / 4));
            Assert.That(defaults.KvHeads, Is.EqualTo(4), "no num_key_value_heads means multi-head attention");
        }
    }

    [Test]
    public void model_config_falls_back_to_model_type_without_architectures()
    {
        var json = ConfigOf(new SyntheticModelSpec { Architecture = Architecture.Qwen2 });
        json.Remove("architectures");
        var config = Parse(json);
        Assert.That((config.Architecture, config.ArchitectureName), Is.EqualTo((Architecture.Qwen2, "Qwen2ForCausalLM")));
    }

    [Test]
    public void model_config_reads_eos_token_id_as_a_list()
    {
        var json = ConfigOf(new SyntheticModelSpec());
        json["eos_token_id"] = new JsonArray(1, 2, 5);
        Assert.That(Parse(json).EosTokenIds, Is.EqualTo(Values(1, 2, 5)));
    }

    [Test]
    public void model_config_merges_eos_token_ids_from_generation_config()
    {
        File.WriteAllText(Path.Combine(_directory, "config.json"), ConfigOf(new SyntheticModelSpec()).ToJsonString());
        File.WriteAllText(Path.Combine(_directory, "generation_config.json"), "{\"bos_token_id\": 0, \"eos_token_id\": [1, 7]}");

        var config = ModelConfig.Load(_directory);
        Assert.That(config.EosTokenIds, Is.EqualTo(Values(1, 7)), "config.json's 1, then generation_config's 7, without repeating 1");
    }

    // ---------------------------------------------------------------- refused configs

    private static IEnumerable<TestCaseData> RefusedConfigs()
    {
        yield return Refused("unsupported_architecture", json => json["architectures"] = new JsonArray("GPTNeoXForCausalLM"), "GPTNeoXForCausalLM");
        yield return Refused("unknown_model_type", json =>
        {
            json.Remove("architectures");
            json["model_type"] = "gemma";
        }, "gemma");
        yield return Refused("architectures_not_strings", json => json["architectures"] = new JsonArray(7), "architectures");
        yield return Refused("two_architectures", json => json["architectures"] = new JsonArray("LlamaForCausalLM", "MistralForCausalLM"), "architectures");
        yield return Refused("hidden_act_gelu", json => json["hidden_act"] = "gelu", "hidden_act", "gelu");
        yield return Refused("mlp_bias_true", json => json["mlp_bias"] = true, "mlp_bias");
        yield return Refused("rope_scaling_yarn", json => json["rope_scaling"] = new JsonObject { ["rope_type"] = "yarn", ["factor"] = 4.0 },
            "rope_scaling", "yarn");
        yield return Refused("rope_scaling_without_type", json => json["rope_scaling"] = new JsonObject { ["factor"] = 4.0 }, "rope_scaling", "rope_type");
        yield return Refused("llama3_rope_scaling_without_factor", json => json["rope_scaling"] = new JsonObject
        {
            ["rope_type"] = "llama3",
            ["low_freq_factor"] = 1.0,
            ["high_freq_factor"] = 4.0,
            ["original_max_position_embeddings"] = 64,
        }, "factor");
        yield return Refused("llama3_rope_scaling_high_not_above_low", json => json["rope_scaling"] = new JsonObject
        {
            ["rope_type"] = "llama3",
            ["factor"] = 8.0,
            ["low_freq_factor"] = 4.0,
            ["high_freq_factor"] = 1.0,
            ["original_max_position_embeddings"] = 64,
        }, "high_freq_factor", "low_freq_factor");
        yield return Refused("quantization_config", json => json["quantization_config"] = new JsonObject { ["quant_method"] = "gptq", ["bits"] = 4 },
            "quantization_config");
        yield return Refused("heads_not_multiple_of_kv_heads", json => json["num_key_value_heads"] = 3, "num_attention_heads", "num_key_value_heads");
        yield return Refused("missing_hidden_size", json => json.Remove("hidden_size"), "hidden_size");
        yield return Refused("missing_vocab_size", json => json.Remove("vocab_size"), "vocab_size");
        yield return Refused("non_integer_num_hidden_layers", json => json["num_hidden_layers"] = 2.5, "num_hidden_layers", "2.5");
        yield return Refused("string_intermediate_size", json => json["intermediate_size"] = "160", "intermediate_size");
        yield return Refused("zero_layers", json => json["num_hidden_layers"] = 0, "num_hidden_layers");
        yield return Refused("odd_head_dim", json => json["head_dim"] = 15, "head_dim");
        yield return Refused("string_rms_norm_eps", json => json["rms_norm_eps"] = "1e-5", "rms_norm_eps");
        yield return Refused("string_tie_word_embeddings", json => json["tie_word_embeddings"] = "yes", "tie_word_embeddings");
        yield return Refused("eos_token_id_string", json => json["eos_token_id"] = "</s>", "eos_token_id");
        yield return Refused("eos_token_id_list_with_string", json => json["eos_token_id"] = new JsonArray(1, "2"), "eos_token_id");
        yield return Refused("qwen2_use_sliding_window", json =>
        {
            json["architectures"] = new JsonArray("Qwen2ForCausalLM");
            json["use_sliding_window"] = true;
        }, "use_sliding_window");
        yield return Refused("mistral_non_integer_sliding_window", json =>
        {
            json["architectures"] = new JsonArray("MistralForCausalLM");
            json["sliding_window"] = "4096";
        }, "sliding_window");
    }

    private static TestCaseData Refused(string name, Action<JsonObject> edit, params string[] fragments) =>
        new TestCaseData(edit, fragments).SetName($"model_config_rejects({name})");

    [TestCaseSource(nameof(RefusedConfigs))]
    public void Rejects(Action<JsonObject> edit, string[] fragments)
    {
        var json = ConfigOf(new SyntheticModelSpec());
        edit(json);

        var error = Assert.Throws<ModelConfigException>(() => Parse(json));
        using (Assert.EnterMultipleScope())
        {
            Assert.That(error.Message, Does.Contain("config.json"));
            foreach (string fragment in fragments)
            {
                Assert.That(error.Message, Does.Contain(fragment));
            }
        }
    }

    [Test]
    public void model_config_rejects_a_config_that_is_not_json()
    {
        File.WriteAllText(Path.Combine(_directory, "config.json"), "{\"hidden_size\": ");
        var error = Assert.Throws<ModelConfigException>(() => ModelConfig.Load(_directory));
        Assert.That(error.Message, Does.Contain(Path.Combine(_directory, "config.json")));
    }

    [Test]
    public void model_config_rejects_a_folder_without_config()
    {
        var error = Assert.Throws<ModelConfigException>(() => ModelConfig.Load(_directory));
        Assert.That(error.Message, Does.Contain("config.json").And.Contain(_directory));
    }

    // ---------------------------------------------------------------- weight map

    private string WriteModel(SyntheticModelSpec spec,
        Func<IReadOnlyList<(string Name, DType DType, int[] Shape, byte[] Data)>, IEnumerable<(string Name, DType DType, int[] Shape, byte[] Data)>> edit) =>
        SyntheticModel.Write(Path.Combine(_directory, "model"), spec, tensors => [.. edit(tensors)]);

    private static ModelLoadOptions Options => new() { Threads = 1, ContextLength = 64 };

    private void AssertNothingMapped()
    {
        if (OperatingSystem.IsLinux())
        {
            Assert.That(File.ReadAllText("/proc/self/maps"), Does.Not.Contain(Path.GetFileName(_directory)), "a failed load left the weights mapped");
        }
    }

    [TestCase("model.layers.1.mlp.up_proj.weight", Architecture.Llama, TestName = "weight_map_rejects(missing_up_proj)")]
    [TestCase("model.embed_tokens.weight", Architecture.Llama, TestName = "weight_map_rejects(missing_embedding)")]
    [TestCase("lm_head.weight", Architecture.Llama, TestName = "weight_map_rejects(missing_untied_lm_head)")]
    [TestCase("model.layers.0.self_attn.k_proj.bias", Architecture.Qwen2, TestName = "weight_map_rejects(missing_qwen2_k_bias)")]
    public void RejectsMissingTensor(string missing, Architecture architecture)
    {
        string model = WriteModel(new SyntheticModelSpec { Architecture = architecture }, tensors => tensors.Where(tensor => tensor.Name != missing));

        var error = Assert.Throws<ModelConfigException>(() => LlamaModel.Load(model, Options).Dispose());
        using (Assert.EnterMultipleScope())
        {
            Assert.That(error.Message, Does.Contain($"'{missing}'"));
            Assert.That(error.Message, Does.Contain("missing"));
            Assert.That(error.Message, Does.Contain(model));
        }
        AssertNothingMapped();
    }

    [Test]
    public void weight_map_rejects_a_misshapen_tensor_naming_both_shapes()
    {
        var spec = new SyntheticModelSpec();
        const string Name = "model.layers.0.self_attn.k_proj.weight";
        // Expected [kv_heads * head_dim, hidden] = [32, 64]; stored as if kv_heads were 1.
        string model = WriteModel(spec, tensors => tensors.Select(tensor => tensor.Name == Name
            ? (tensor.Name, tensor.DType, [16, 64], new byte[16 * 64 * tensor.DType.SizeOf()])
            : tensor));

        var error = Assert.Throws<ModelConfigException>(() => LlamaModel.Load(model, Options).Dispose());
        using (Assert.EnterMultipleScope())
        {
            Assert.That(error.Message, Does.Contain($"'{Name}'"));
            Assert.That(error.Message, Does.Contain("[16, 64]"));
            Assert.That(error.Message, Does.Contain("[32, 64]"));
        }
        AssertNothingMapped();
    }

    [TestCase("model.layers.0.self_attn.o_proj.bias", 64, TestName = "weight_map_rejects(o_bias_without_attention_bias)")]
    [TestCase("model.layers.2.input_layernorm.weight", 64, TestName = "weight_map_rejects(layer_beyond_num_hidden_layers)")]
    [TestCase("model.layers.0.mlp.gate_proj.bias", 160, TestName = "weight_map_rejects(mlp_bias_tensor)")]
    public void RejectsUnexpectedTensor(string extra, int length)
    {
        var spec = new SyntheticModelSpec();
        string model = WriteModel(spec, tensors => tensors.Append((extra, spec.DType, [length], new byte[length * spec.DType.SizeOf()])));

        var error = Assert.Throws<ModelConfigException>(() => LlamaModel.Load(model, Options).Dispose());
        Assert.That(error.Message, Does.Contain($"'{extra}'"));
        AssertNothingMapped();
    }

    [Test]
    public void weight_map_accepts_stored_rotary_tables_and_a_stored_copy_of_a_tied_head()
    {
        var spec = new SyntheticModelSpec { TieWordEmbeddings = true };
        string model = WriteModel(spec, tensors =>
        {
            var embedding = tensors.Single(tensor => tensor.Name == "model.embed_tokens.weight");
            return tensors
                .Append(("lm_head.weight", embedding.DType, embedding.Shape, embedding.Data))
                .Append(("model.layers.0.self_attn.rotary_emb.inv_freq", DType.F32, [8], new byte[8 * sizeof(float)]));
        });

        using var loaded = LlamaModel.Load(model, Options);
        Assert.That(loaded.LmHead.Name, Is.EqualTo("lm_head.weight"));
    }

    // ---------------------------------------------------------------- RoPE

    [TestCase(16, 10000.0, 8.0, 1.0, 4.0, 64, TestName = "rope_llama3_inverse_frequencies(head_dim_16_theta_1e4)")]
    [TestCase(64, 500000.0, 32.0, 1.0, 4.0, 8192, TestName = "rope_llama3_inverse_frequencies(llama_3_2_like)")]
    [TestCase(128, 500000.0, 8.0, 1.0, 4.0, 8192, TestName = "rope_llama3_inverse_frequencies(llama_3_1_like)")]
    public void Llama3InverseFrequencies(int headDim, double theta, double factor, double low, double high, int original)
    {
        var json = ConfigOf(new SyntheticModelSpec { HiddenSize = 4 * headDim, HeadDim = headDim, RopeTheta = theta, MaxPositionEmbeddings = 8 * original });
        json["rope_scaling"] = new JsonObject
        {
            ["rope_type"] = "llama3",
            ["factor"] = factor,
            ["low_freq_factor"] = low,
            ["high_freq_factor"] = high,
            ["original_max_position_embeddings"] = original,
        };

        float[] actual = RopeTable.InverseFrequencies(Parse(json));
        var (expected, regimes) = ReferenceLlama3(headDim, theta, factor, low, high, original);

        Assert.That(actual, Has.Length.EqualTo(headDim / 2));
        // Every case must reach all three branches (kept, blended, divided), or it would not test the blend.
        Assert.That(regimes, Is.EqualTo(Values(true, true, true)), "high-frequency, medium, low-frequency branches reached");
        for (int i = 0; i < expected.Length; i++)
        {
            double relative = Math.Abs(actual[i] - expected[i]) / expected[i];
            Assert.That(relative, Is.LessThanOrEqualTo(1e-6), $"inv_freq[{i}]: {actual[i]:R} vs fp64 {expected[i]:R}");
        }
    }

    [Test]
    public void rope_linear_scaling_divides_every_frequency()
    {
        var json = ConfigOf(new SyntheticModelSpec());
        json["rope_scaling"] = new JsonObject { ["rope_type"] = "linear", ["factor"] = 4.0 };
        float[] actual = RopeTable.InverseFrequencies(Parse(json));
        for (int i = 0; i < actual.Length; i++)
        {
            double expected = 1.0 / Math.Pow(10000.0, 2.0 * i / 16) / 4.0;
            Assert.That(Math.Abs(actual[i] - expected) / expected, Is.LessThanOrEqualTo(1e-6), $"inv_freq[{i}]");
        }
    }

    /// <summary>
    /// transformers' _compute_llama3_parameters in fp64, written as three explicit branches rather than the
    /// library's masked blend, so that a shared slip in the formula cannot pass unnoticed.
    /// </summary>
    private static (double[] Frequencies, bool[] Regimes) ReferenceLlama3(int headDim, double theta, double factor, double low, double high, int original)
    {
        double lowFrequencyWavelength = original / low;
        double highFrequencyWavelength = original / high;
        var frequencies = new double[headDim / 2];
        var regimes = new bool[3];
        for (int i = 0; i < frequencies.Length; i++)
        {
            double frequency = 1.0 / Math.Pow(theta, 2.0 * i / headDim);
            double wavelength = 2 * Math.PI / frequency;
            if (wavelength < highFrequencyWavelength)
            {
                frequencies[i] = frequency;
                regimes[0] = true;
            }
            else if (wavelength > lowFrequencyWavelength)
            {
                frequencies[i] = frequency / factor;
                regimes[2] = true;
            }
            else
            {
                double smooth = (original / wavelength - low) / (high - low);
                frequencies[i] = (1 - smooth) * frequency / factor + smooth * frequency;
                regimes[1] = true;
            }
        }
        return (frequencies, regimes);
    }
}

using KernelLM.Models;
using KernelLM.Models.Llama;
using KernelLM.Runtime;
using KernelLM.Tests.Fixtures;
using KernelLM.Tests.Support;
using NUnit.Framework;

namespace KernelLM.Tests.Models;

/// <summary>
/// Every model shape the loader distinguishes loads and runs a forward pass to finite, non-degenerate logits.
/// Only a smoke test: the numeric comparison against a reference implementation lives elsewhere.
/// </summary>
[TestFixture]
public sealed class SyntheticModelSmokeTests
{
    private string _directory = "";

    [SetUp]
    public void CreateDirectory()
    {
        _directory = TestPaths.NewTemporaryDirectory("smoke");
    }

    [TearDown]
    public void DeleteDirectory() => Directory.Delete(_directory, recursive: true);

    private static IEnumerable<TestCaseData> Models()
    {
        // Mistral runs 24 tokens so that its 16-token window actually cuts keys off.
        yield return Model("llama_gqa_bf16", new SyntheticModelSpec(), 10);
        yield return Model("llama_tied_f16", new SyntheticModelSpec { TieWordEmbeddings = true, DType = DType.F16 }, 10);
        yield return Model("llama_attention_bias_f32", new SyntheticModelSpec { AttentionBias = true, DType = DType.F32 }, 10);
        yield return Model("llama_llama3_rope_scaling", new SyntheticModelSpec { Llama3RopeScaling = true }, 10);
        yield return Model("llama_head_dim_32_not_hidden_over_heads", new SyntheticModelSpec { HeadDim = 32 }, 10);
        yield return Model("mistral_sliding_window_16", new SyntheticModelSpec { Architecture = Architecture.Mistral, SlidingWindow = 16 }, 24);
        yield return Model("mistral_no_sliding_window", new SyntheticModelSpec { Architecture = Architecture.Mistral, SlidingWindow = null }, 10);
        yield return Model("qwen2_bf16", new SyntheticModelSpec { Architecture = Architecture.Qwen2 }, 10);
        yield return Model("llama_sharded", new SyntheticModelSpec { Sharded = true, Seed = 3 }, 10);
    }

    private static TestCaseData Model(string name, SyntheticModelSpec spec, int tokens) =>
        new TestCaseData(spec, tokens).SetName($"synthetic_model_forward_is_finite({name})");

    [TestCaseSource(nameof(Models))]
    public void ForwardIsFinite(SyntheticModelSpec spec, int tokenCount)
    {
        string directory = SyntheticModel.Write(Path.Combine(_directory, "model"), spec);
        using var model = LlamaModel.Load(directory, new ModelLoadOptions { Threads = 2, ContextLength = 64 });
        using (Assert.EnterMultipleScope())
        {
            Assert.That(model.Config.Architecture, Is.EqualTo(spec.Architecture));
            Assert.That(model.Config.HeadDim, Is.EqualTo(spec.ResolvedHeadDim));
            Assert.That(model.Files, Has.Count.EqualTo(spec.Sharded ? 2 : 1));
        }

        using var session = model.CreateSession();
        int[] tokens = [.. Enumerable.Range(0, tokenCount).Select(i => (3 + 97 * i) % spec.VocabularySize)];
        var logits = new float[spec.VocabularySize];
        session.Forward(tokens, logits);
        AssertUsable(logits, "prefill");

        // One decode step on top of the cache, the path generation takes for every later token.
        session.Forward([5], logits);
        AssertUsable(logits, "decode");
        Assert.That(session.Length, Is.EqualTo(tokenCount + 1));
    }

    private static void AssertUsable(float[] logits, string step)
    {
        // Logged so that a failure (or a drift of the fixture's scaling) shows the range at a glance.
        TestContext.Out.WriteLine($"{step}: logits in [{logits.Min():G4}, {logits.Max():G4}]");
        using (Assert.EnterMultipleScope())
        {
            Assert.That(logits.All(float.IsFinite), Is.True, $"{step}: every logit finite");
            // Weights are scaled for logits of O(1..10): all-equal or exploding logits mean a broken pass.
            Assert.That(logits.Max() - logits.Min(), Is.GreaterThan(0.1f), $"{step}: logits not all equal");
            Assert.That(logits.Max(Math.Abs), Is.LessThan(1000f), $"{step}: logits of sane magnitude");
        }
    }
}

using KernelLM.Models;
using KernelLM.Models.Llama;
using KernelLM.Runtime.KvSelect;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.KvSelect;

/// <summary>
/// TokenSelect's compacted position mode on the CPU device with the embedded model (tiny-stories): keys cached before
/// RoPE, q unrotated, attention rotating both by their slots in the selected list. With a k that covers the context the
/// slots are the true positions, so it must give standard full attention's logits (prefill chunks and decode steps); with
/// a k that selects, it runs, selects, and differs from standard selection (the positions are compacted); a decode step
/// allocates nothing. The CUDA side (kernels against this twin, in captured graphs) is in KvSelectDeviceTests.
/// </summary>
[TestFixture]
public sealed class KvSelectCompactedTests
{
    private const int Length = 300;

    private static int[] Tokens(int vocabulary) => Enumerable.Range(0, Length).Select(i => (i * 131 + 17) % vocabulary).ToArray();

    private static LlamaModel Load(KvSelectOptions? select) =>
        LlamaModel.Load(TestPaths.TinyStories, new ModelLoadOptions { Threads = 2, ContextLength = 512, KvSelect = select });

    [Test]
    public void Compacted_positions_with_a_covering_k_equal_full_attention()
    {
        using var plain = Load(null);
        int vocabulary = plain.Config.VocabularySize;
        int[] tokens = Tokens(vocabulary);
        // Scoring with a selector runs a token at a time: the full-attention reference decodes token by token too.
        var full = new float[Length * vocabulary];
        using (var decode = plain.CreateSession())
        {
            for (int i = 0; i < Length; i++)
            {
                decode.Forward(tokens.AsSpan(i, 1), full.AsSpan(i * vocabulary, vocabulary));
            }
        }
        var fullPrefill = new float[vocabulary];
        using (var prefill = plain.CreateSession())
        {
            prefill.Forward(tokens, fullPrefill);
        }

        var covering = new KvSelectOptions { TopK = Length, Initial = 0, Local = 1, Chunk = 64, Positions = KvSelectPositions.Compacted };
        using var model = Load(covering);
        using var session = model.CreateSession();
        var scored = new float[Length * vocabulary];
        session.Forward(tokens, scored, allPositions: true);
        Assert.That(session.KvSelectStatistics!.Value.Selections, Is.Zero, "a covering k never selects");
        double worst = 0;
        for (int i = 0; i < Length; i++)
        {
            worst = Math.Max(worst, AssertClose(full.AsSpan(i * vocabulary, vocabulary), scored.AsSpan(i * vocabulary, vocabulary), $"position {i}"));
        }
        // Prefill in chunks of 64 (the prefill rule with the rotation inside attention).
        session.Reset();
        var chunked = new float[vocabulary];
        session.Forward(tokens, chunked);
        double prefillWorst = AssertClose(fullPrefill, chunked, "chunked prefill");
        TestContext.Out.WriteLine($"max |standard - compacted| = {worst:E3} (decode, {Length} positions), {prefillWorst:E3} (prefill)");
    }

    [Test]
    public void Compacted_selection_selects_and_differs_from_standard_selection()
    {
        var options = new KvSelectOptions { TopK = 32, Initial = 8, Local = 32, CacheThreshold = 1f, Chunk = 64 };
        using var standardModel = Load(options);
        using var compactedModel = Load(options with { Positions = KvSelectPositions.Compacted });
        int vocabulary = standardModel.Config.VocabularySize;
        int[] tokens = Tokens(vocabulary);
        var standard = new float[Length * vocabulary];
        var compacted = new float[Length * vocabulary];
        using var standardSession = standardModel.CreateSession();
        using var compactedSession = compactedModel.CreateSession();
        standardSession.Forward(tokens, standard, allPositions: true);
        compactedSession.Forward(tokens, compacted, allPositions: true);
        Assert.That(compacted, Has.All.Matches<float>(float.IsFinite));
        Assert.That(compactedSession.KvSelectStatistics!.Value.Selections, Is.GreaterThan(0));
        // Up to init + k + local = 72 positions nothing is selected and both are full attention.
        int firstSelecting = options.MaxIndices;
        for (int i = 0; i < firstSelecting; i++)
        {
            AssertClose(standard.AsSpan(i * vocabulary, vocabulary), compacted.AsSpan(i * vocabulary, vocabulary), $"position {i}");
        }
        double largest = 0;
        for (int i = firstSelecting; i < Length; i++)
        {
            for (int v = 0; v < vocabulary; v++)
            {
                largest = Math.Max(largest, Math.Abs(standard[i * vocabulary + v] - compacted[i * vocabulary + v]));
            }
        }
        TestContext.Out.WriteLine($"max |standard - compacted| over the selecting positions: {largest:E3}");
        Assert.That(largest, Is.GreaterThan(1e-3), "compacted positions change the selecting steps' logits");
    }

    [Test]
    public void A_cpu_decode_step_with_compacted_selection_allocates_nothing()
    {
        using var model = Load(new KvSelectOptions { TopK = 16, Initial = 4, Local = 8, Positions = KvSelectPositions.Compacted });
        using var session = model.CreateSession();
        int[] tokens = Tokens(model.Config.VocabularySize);
        var logits = new float[model.Config.VocabularySize];
        session.Forward(tokens.AsSpan(0, 100), logits);
        for (int i = 100; i < 140; i++)
        {
            session.Forward(tokens.AsSpan(i, 1), logits);
        }
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 140; i < 160; i++)
        {
            session.Forward(tokens.AsSpan(i, 1), logits);
        }
        Assert.That(GC.GetAllocatedBytesForCurrentThread() - before, Is.Zero, "bytes allocated by 20 decode steps with compacted selection");
        Assert.That(session.KvSelectStatistics!.Value.Selections, Is.GreaterThan(0));
    }

    /// <summary>Within 1e-4 x (1 + max |logit|): fp32 rounding of the same rotation done in a different place (RoPE at
    /// write time vs inside attention; on the CPU both read the same tables, so this is usually exact).</summary>
    private static double AssertClose(ReadOnlySpan<float> expected, ReadOnlySpan<float> actual, string what)
    {
        double largest = 0, worst = 0;
        for (int i = 0; i < expected.Length; i++)
        {
            largest = Math.Max(largest, Math.Abs(expected[i]));
            worst = Math.Max(worst, Math.Abs(expected[i] - actual[i]));
        }
        Assert.That(worst, Is.LessThanOrEqualTo(1e-4 * (1 + largest)), $"{what}: max |standard - compacted|");
        return worst;
    }
}

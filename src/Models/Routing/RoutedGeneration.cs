using KernelLM.Models.Scoring;
using KernelLM.Runtime;
using KernelLM.Runtime.Generation;

namespace KernelLM.Models.Routing;

/// <summary>
/// Small/large routing on two loaded models (docs/adaptive-decoding.md): the draft (small) model proposes every
/// token; where its entropy is above <see cref="RoutingOptions.EntropyThreshold"/> the large model produces the token
/// instead (<see cref="RoutedSession"/>). Both models' sequence states are leased for the length of the stream.
/// </summary>
public static class RoutedGeneration
{
    /// <summary>
    /// Streams a routed generation of <paramref name="prompt"/> (tokenized by the large model's tokenizer, which the
    /// draft must share: same id → token table, same BOS handling, same LM head width). <paramref name="routingStats"/>
    /// says how many tokens each model produced.
    /// </summary>
    public static IEnumerable<GeneratedToken> Generate(LanguageModel large, LanguageModel draft, string prompt, GenerationOptions options,
        RoutingOptions routing, GenerationStats stats, RoutingStats routingStats, CancellationToken cancellation = default)
    {
        ArgumentNullException.ThrowIfNull(large);
        ArgumentNullException.ThrowIfNull(draft);
        ArgumentNullException.ThrowIfNull(prompt);
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(routing);
        ArgumentNullException.ThrowIfNull(stats);
        ArgumentNullException.ThrowIfNull(routingStats);
        options.Validate();
        routing.Validate();
        CheckPair(large, draft);
        int[] ids = large.Encode(prompt);
        return Leased(large, draft, ids, options, routing, stats, routingStats, cancellation);
    }

    /// <summary>Throws <see cref="InvalidParameterException"/> (draft-model) unless the two models read token ids alike
    /// and their LM heads have the same width.</summary>
    public static void CheckPair(LanguageModel large, LanguageModel draft)
    {
        if (ReferenceEquals(large, draft))
        {
            throw new InvalidParameterException("draft-model", "is the large model itself (one sequence state cannot run both; load the folder a second time)");
        }
        int width;
        try
        {
            width = Scorer.CheckReference(large, draft);
        }
        catch (InvalidParameterException error)
        {
            throw new InvalidParameterException("draft-model", error.Message["invalid reference: ".Length..]);
        }
        if (width != large.Config.VocabularySize || width != draft.Config.VocabularySize)
        {
            throw new InvalidParameterException("draft-model",
                $"vocab_size {draft.Config.VocabularySize} in {draft.Directory} and {large.Config.VocabularySize} in {large.Directory} differ "
                + "(padding rows only); routing needs LM heads of the same width");
        }
    }

    private static IEnumerable<GeneratedToken> Leased(LanguageModel large, LanguageModel draft, int[] ids, GenerationOptions options,
        RoutingOptions routing, GenerationStats stats, RoutingStats routingStats, CancellationToken cancellation)
    {
        // Lease in load order, as the scorer does: two callers holding the same pair in opposite roles cannot deadlock.
        bool largeFirst = large.LoadOrder < draft.LoadOrder;
        using var first = (largeFirst ? large : draft).LeaseSession();
        using var second = (largeFirst ? draft : large).LeaseSession();
        var largeSession = largeFirst ? first.Session : second.Session;
        var draftSession = largeFirst ? second.Session : first.Session;
        using var routed = new RoutedSession(draftSession, largeSession, routing, routingStats, large.Tokenizer);
        foreach (var token in Generator.Run(routed, large.Tokenizer, ids, options, stats, cancellation))
        {
            yield return token;
        }
    }
}

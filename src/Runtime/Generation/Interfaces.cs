namespace KernelLM.Runtime.Generation;

/// <summary>
/// One sequence's view of a decoder: its KV cache and activations, allocated once at <see cref="Capacity"/>.
/// <see cref="Forward"/> appends tokens at positions Length.. and writes logits.
/// </summary>
public interface IDecoderSession : IDisposable
{
    int VocabularySize { get; }

    /// <summary>Most tokens the session's KV cache holds.</summary>
    int Capacity { get; }

    /// <summary>Tokens already in the KV cache.</summary>
    int Length { get; }

    /// <summary>Forgets the sequence (the next Forward starts at position 0).</summary>
    void Reset();

    /// <summary>
    /// Runs <paramref name="tokens"/> through the model at positions Length.. and appends them to the cache.
    /// logits: [vocabulary] for the last token only, or [tokens.Length, vocabulary] when
    /// <paramref name="allPositions"/>. Allocates nothing.
    /// </summary>
    void Forward(ReadOnlySpan<int> tokens, Span<float> logits, bool allPositions = false);
}

/// <summary>Text to token ids and back, as the model's tokenizer files say.</summary>
public interface ITextTokenizer
{
    /// <summary>Ids for the text, with BOS prepended where the model's tokenizer config asks for it.</summary>
    int[] Encode(string text, bool addSpecialTokens = true);

    /// <summary>Text of the ids; special tokens are skipped.</summary>
    string Decode(ReadOnlySpan<int> ids);

    IReadOnlyList<int> EosTokenIds { get; }
}

namespace KernelLM.Runtime.Generation;

/// <summary>
/// Turns a stream of token ids into text pieces without ever splitting a multi-byte character: a token
/// that ends inside a UTF-8 sequence decodes to U+FFFD and is held back until the character completes.
/// Decoding a window (from the last emitted boundary) rather than single tokens keeps tokenizers with
/// leading-space rules (SentencePiece's ▁) right.
/// </summary>
public sealed class IncrementalDetokenizer
{
    private readonly ITextTokenizer _tokenizer;
    private readonly List<int> _ids = new(256);
    private int _prefixStart;
    private int _readStart;

    public IncrementalDetokenizer(ITextTokenizer tokenizer) => _tokenizer = tokenizer;

    /// <summary>Adds a token; returns the text it completes (possibly empty).</summary>
    public string Push(int token)
    {
        _ids.Add(token);
        var ids = System.Runtime.InteropServices.CollectionsMarshal.AsSpan(_ids);
        string prefix = _tokenizer.Decode(ids[_prefixStart.._readStart]);
        string full = _tokenizer.Decode(ids[_prefixStart..]);
        if (full.Length > prefix.Length && !full.EndsWith('\uFFFD') && full.StartsWith(prefix, StringComparison.Ordinal))
        {
            string piece = full[prefix.Length..];
            _prefixStart = _readStart;
            _readStart = _ids.Count;
            return piece;
        }
        return string.Empty;
    }

    /// <summary>Whatever is still held back (an incomplete character at the end of the stream).</summary>
    public string Flush()
    {
        var ids = System.Runtime.InteropServices.CollectionsMarshal.AsSpan(_ids);
        string prefix = _tokenizer.Decode(ids[_prefixStart.._readStart]);
        string full = _tokenizer.Decode(ids[_prefixStart..]);
        _prefixStart = _readStart = _ids.Count;
        return full.Length > prefix.Length && full.StartsWith(prefix, StringComparison.Ordinal) ? full[prefix.Length..] : string.Empty;
    }
}

using System.Text;
using KernelLM.Runtime.Generation;

namespace KernelLM.Tests.Support;

/// <summary>
/// A test tokenizer: ids 0..255 are single bytes, ids 256.. are the given pieces of text. Decoding joins the bytes
/// and reads them as UTF-8, so a token that ends inside a multi-byte character decodes to U+FFFD, as with a real
/// byte-level BPE.
/// </summary>
public sealed class ByteTokenizer(params string[] pieces) : ITextTokenizer
{
    public const int FirstPiece = 256;

    public IReadOnlyList<int> EosTokenIds { get; } = [];

    public int[] Encode(string text, bool addSpecialTokens = true) => [.. Encoding.UTF8.GetBytes(text).Select(b => (int)b)];

    public string Decode(ReadOnlySpan<int> ids)
    {
        var bytes = new List<byte>();
        foreach (int id in ids)
        {
            if (id < FirstPiece)
            {
                bytes.Add((byte)id);
            }
            else
            {
                bytes.AddRange(Encoding.UTF8.GetBytes(pieces[id - FirstPiece]));
            }
        }
        return Encoding.UTF8.GetString([.. bytes]);
    }
}

using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using KernelLM.Runtime;

namespace KernelLM.Models.Tokenization;

/// <summary>
/// The id → token table of a tokenizer.json: the model's vocabulary (<c>model.vocab</c>: an object token → id
/// for BPE / WordPiece / WordLevel, or a list of [piece, score] for Unigram, where the id is the index) with the
/// <c>added_tokens</c> on top (an added token's content wins where both name an id). Two models whose tables
/// are equal read token ids the same way, which is what comparing their log-probs needs.
/// </summary>
public sealed class TokenizerVocabulary
{
    private readonly string?[] _tokens;

    private TokenizerVocabulary(string filePath, string?[] tokens)
    {
        FilePath = filePath;
        _tokens = tokens;
        Fingerprint = ComputeFingerprint(tokens);
    }

    public string FilePath { get; }

    /// <summary>Largest id plus one: the rows of an LM head that correspond to tokens (config vocab_size may pad past it).</summary>
    public int Size => _tokens.Length;

    /// <summary>The token of <paramref name="id"/>; null for an id inside <see cref="Size"/> that names no token.</summary>
    public string? this[int id] => (uint)id < (uint)_tokens.Length ? _tokens[id] : null;

    /// <summary>SHA-256 (hex) over every (id, token) pair in id order: equal tables, equal fingerprints.</summary>
    public string Fingerprint { get; }

    /// <summary>The smallest id whose token differs between the two tables (one side may lack it); -1 when they are equal.</summary>
    public int FirstDifference(TokenizerVocabulary other)
    {
        ArgumentNullException.ThrowIfNull(other);
        if (Fingerprint == other.Fingerprint)
        {
            return -1;
        }
        int length = Math.Max(Size, other.Size);
        for (int id = 0; id < length; id++)
        {
            if (!string.Equals(this[id], other[id], StringComparison.Ordinal))
            {
                return id;
            }
        }
        return -1; // a SHA-256 collision: not a case to handle
    }

    public static TokenizerVocabulary Read(string tokenizerJsonPath)
    {
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(File.ReadAllBytes(tokenizerJsonPath));
        }
        catch (JsonException error)
        {
            throw new ModelConfigException($"{tokenizerJsonPath}: not valid JSON: {error.Message}", error);
        }
        using (document)
        {
            var tokens = new Dictionary<int, string>();
            var root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object || !root.TryGetProperty("model", out var model) || model.ValueKind != JsonValueKind.Object
                || !model.TryGetProperty("vocab", out var vocab))
            {
                throw new ModelConfigException($"{tokenizerJsonPath}: no model.vocab");
            }
            try
            {
                if (vocab.ValueKind == JsonValueKind.Object)
                {
                    foreach (var entry in vocab.EnumerateObject())
                    {
                        tokens[entry.Value.GetInt32()] = entry.Name;
                    }
                }
                else if (vocab.ValueKind == JsonValueKind.Array)
                {
                    int id = 0;
                    foreach (var entry in vocab.EnumerateArray())
                    {
                        tokens[id++] = entry[0].GetString()!;
                    }
                }
                else
                {
                    throw new ModelConfigException($"{tokenizerJsonPath}: model.vocab is a {vocab.ValueKind}, not an object or a list");
                }
                if (root.TryGetProperty("added_tokens", out var added) && added.ValueKind == JsonValueKind.Array)
                {
                    foreach (var entry in added.EnumerateArray())
                    {
                        tokens[entry.GetProperty("id").GetInt32()] = entry.GetProperty("content").GetString()!;
                    }
                }
            }
            catch (Exception error) when (error is InvalidOperationException or FormatException or KeyNotFoundException or IndexOutOfRangeException)
            {
                throw new ModelConfigException($"{tokenizerJsonPath}: malformed vocabulary entry: {error.Message}", error);
            }
            if (tokens.Count == 0)
            {
                throw new ModelConfigException($"{tokenizerJsonPath}: the vocabulary is empty");
            }
            if (tokens.Keys.Min() < 0)
            {
                throw new ModelConfigException($"{tokenizerJsonPath}: negative token id {tokens.Keys.Min()}");
            }
            var table = new string?[tokens.Keys.Max() + 1];
            foreach (var (id, token) in tokens)
            {
                table[id] = token;
            }
            return new TokenizerVocabulary(tokenizerJsonPath, table);
        }
    }

    private static string ComputeFingerprint(string?[] tokens)
    {
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        Span<byte> header = stackalloc byte[8];
        for (int id = 0; id < tokens.Length; id++)
        {
            if (tokens[id] is not string token)
            {
                continue;
            }
            byte[] text = Encoding.UTF8.GetBytes(token);
            BitConverter.TryWriteBytes(header[..4], id);
            BitConverter.TryWriteBytes(header[4..], text.Length);
            hash.AppendData(header);
            hash.AppendData(text);
        }
        return Convert.ToHexStringLower(hash.GetHashAndReset());
    }
}

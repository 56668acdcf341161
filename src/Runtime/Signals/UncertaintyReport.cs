using System.Text.Encodings.Web;
using System.Text.Json;
using KernelLM.Runtime.Generation;

namespace KernelLM.Runtime.Signals;

/// <summary>An alternative the model weighed at one step: its id, its text decoded on its own, its log-prob.</summary>
public readonly record struct ReportAlternative(int Id, string Text, float LogProbability);

/// <summary>
/// One generated token of a report: its id, the text it adds to the generated text (empty when its bytes only
/// start a character that a later token completes) and the signals of the distribution it was drawn from.
/// </summary>
public sealed record ReportToken(int Id, string Text, TokenSignals Signals, IReadOnlyList<ReportAlternative> Top);

/// <summary>
/// An uncertainty report of one generation: the prompt, every generated token with its signals and the
/// sequence-level summary. Written as JSON (<see cref="WriteJson"/>) or as a self-contained HTML page
/// (<see cref="UncertaintyReportHtml"/>). Fields and definitions: docs/token-signals.md.
/// </summary>
public sealed record UncertaintyReport(string Model, string Prompt, IReadOnlyList<ReportToken> Tokens, UncertaintySummary Summary,
    FinishReason FinishReason)
{
    /// <summary>The generated text: the tokens' texts concatenated. It includes a stop string that ended the
    /// generation (the streamed text leaves that out), since the report describes every generated token.</summary>
    public string Text => string.Concat(Tokens.Select(t => t.Text));

    /// <summary>finish_reason as written: end_of_sequence, stop_string, max_tokens, context_full, or none
    /// (the stream did not run to its end, e.g. it was cancelled).</summary>
    public static string FinishReasonName(FinishReason reason) => reason switch
    {
        FinishReason.EndOfSequence => "end_of_sequence",
        FinishReason.StopString => "stop_string",
        FinishReason.MaxTokens => "max_tokens",
        FinishReason.ContextFull => "context_full",
        _ => "none",
    };

    /// <summary>UTF-8 JSON, indented and readable (non-ASCII text is written as is). Non-finite numbers are null.</summary>
    public void WriteJson(Stream stream) => WriteJson(stream, JavaScriptEncoder.UnsafeRelaxedJsonEscaping, indented: true);

    public string ToJson()
    {
        using var stream = new MemoryStream();
        WriteJson(stream);
        return System.Text.Encoding.UTF8.GetString(stream.GetBuffer(), 0, (int)stream.Length);
    }

    /// <summary>
    /// The JSON with <paramref name="encoder"/>: the HTML page embeds it with <see cref="JavaScriptEncoder.Default"/>,
    /// which writes &lt; &gt; &amp; ' as \u escapes, so no "&lt;/script" or "&lt;!--" can appear inside its script block.
    /// </summary>
    internal void WriteJson(Stream stream, JavaScriptEncoder encoder, bool indented)
    {
        using var writer = new Utf8JsonWriter(stream, new JsonWriterOptions { Encoder = encoder, Indented = indented });
        writer.WriteStartObject();
        writer.WriteString("model", Model);
        writer.WriteString("prompt", Prompt);
        writer.WriteString("text", Text);
        writer.WriteStartArray("tokens");
        foreach (var token in Tokens)
        {
            var signals = token.Signals;
            writer.WriteStartObject();
            writer.WriteNumber("token", token.Id);
            writer.WriteString("text", token.Text);
            WriteNumber(writer, "logprob", signals.LogProbability);
            WriteNumber(writer, "prob", signals.Probability);
            WriteNumber(writer, "entropy", signals.Entropy);
            WriteNumber(writer, "kurtosis", signals.Kurtosis);
            WriteNumber(writer, "margin", signals.Margin);
            writer.WriteStartArray("top");
            foreach (var alternative in token.Top)
            {
                writer.WriteStartObject();
                writer.WriteNumber("token", alternative.Id);
                writer.WriteString("text", alternative.Text);
                WriteNumber(writer, "logprob", alternative.LogProbability);
                writer.WriteEndObject();
            }
            writer.WriteEndArray();
            writer.WriteEndObject();
        }
        writer.WriteEndArray();
        writer.WriteStartObject("summary");
        WriteNumber(writer, "geometric_mean_prob", Summary.GeometricMeanProbability);
        WriteNumber(writer, "arithmetic_mean_prob", Summary.ArithmeticMeanProbability);
        WriteNumber(writer, "mean_kurtosis", Summary.MeanKurtosis);
        WriteNumber(writer, "mean_entropy", Summary.MeanEntropy);
        writer.WriteNumber("tokens", Summary.TokenCount);
        writer.WriteEndObject();
        writer.WriteString("finish_reason", FinishReasonName(FinishReason));
        writer.WriteEndObject();
    }

    // JSON has no NaN or infinity: a non-finite figure (e.g. the log-prob of a masked token, -inf) is null.
    private static void WriteNumber(Utf8JsonWriter writer, string name, float value)
    {
        if (float.IsFinite(value))
        {
            writer.WriteNumber(name, value);
        }
        else
        {
            writer.WriteNull(name);
        }
    }

    private static void WriteNumber(Utf8JsonWriter writer, string name, double value)
    {
        if (double.IsFinite(value))
        {
            writer.WriteNumber(name, value);
        }
        else
        {
            writer.WriteNull(name);
        }
    }
}

/// <summary>
/// Collects a generation's streamed tokens (generated with <see cref="GenerationOptions.Signals"/>) into an
/// <see cref="UncertaintyReport"/>. The per-token texts are not the streamed ones, which stop-string hold-back
/// and incomplete UTF-8 characters delay: <see cref="Build"/> runs the token ids through the model's tokenizer
/// again, the way the generator's detokenizer does, so each token's text is the text it completes and their
/// concatenation is exactly the decoded generation.
/// </summary>
public sealed class UncertaintyReportBuilder
{
    private readonly ITextTokenizer _tokenizer;
    private readonly string _model;
    private readonly string _prompt;
    private readonly List<TokenSignals> _tokens = [];

    public UncertaintyReportBuilder(ITextTokenizer tokenizer, string model, string prompt)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(prompt);
        _tokenizer = tokenizer;
        _model = model;
        _prompt = prompt;
    }

    public int Count => _tokens.Count;

    /// <summary>Adds a streamed token. The final piece of held-back text (id -1) carries no token and is skipped:
    /// <see cref="Build"/> recovers its text from the ids.</summary>
    public void Add(GeneratedToken token)
    {
        if (token.Id < 0)
        {
            return;
        }
        if (token.Signals is null)
        {
            throw new InvalidOperationException($"token {token.Id} carries no signals: generate with GenerationOptions.Signals set to build a report");
        }
        _tokens.Add(token.Signals);
    }

    public UncertaintyReport Build(FinishReason finishReason)
    {
        var detokenizer = new IncrementalDetokenizer(_tokenizer);
        var alternativeTexts = new Dictionary<int, string>();
        var tokens = new List<ReportToken>(_tokens.Count);
        foreach (var signals in _tokens)
        {
            string text = detokenizer.Push(signals.Token);
            var top = new ReportAlternative[signals.Top.Count];
            for (int i = 0; i < top.Length; i++)
            {
                var alternative = signals.Top[i];
                if (!alternativeTexts.TryGetValue(alternative.Id, out string? alternativeText))
                {
                    alternativeText = _tokenizer.Decode([alternative.Id]);
                    alternativeTexts.Add(alternative.Id, alternativeText);
                }
                top[i] = new ReportAlternative(alternative.Id, alternativeText, alternative.LogProbability);
            }
            tokens.Add(new ReportToken(signals.Token, text, signals, top));
        }
        // An incomplete character at the very end (the budget ran out inside it) belongs to the last token.
        string rest = detokenizer.Flush();
        if (rest.Length > 0 && tokens.Count > 0)
        {
            tokens[^1] = tokens[^1] with { Text = tokens[^1].Text + rest };
        }
        return new UncertaintyReport(_model, _prompt, tokens, UncertaintySummary.From(_tokens), finishReason);
    }
}

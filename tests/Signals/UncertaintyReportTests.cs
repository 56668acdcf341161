using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using KernelLM.Models;
using KernelLM.Models.Llama;
using KernelLM.Runtime.Generation;
using KernelLM.Runtime.Sampling;
using KernelLM.Runtime.Signals;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Signals;

/// <summary>Uncertainty reports: what the builder collects, the JSON it writes, and the HTML page's escaping.</summary>
[TestFixture]
public sealed class UncertaintyReportTests
{
    private LanguageModel _model = null!;

    [OneTimeSetUp]
    public void SetUp() => _model = LanguageModel.Load(TestPaths.TinyStories, new ModelLoadOptions { Threads = 2, ContextLength = 256 });

    [OneTimeTearDown]
    public void TearDown() => _model.Dispose();

    private static GenerationOptions Options(int topK, int seed = 5, int tokens = 40, string[]? stops = null) => new()
    {
        MaxNewTokens = tokens,
        Sampling = new SamplingOptions { Temperature = 1.0f, TopK = 40, TopP = 0.95f, Seed = seed },
        StopStrings = stops ?? [],
        Signals = new TokenSignalOptions { TopK = topK },
    };

    /// <summary>Generates, streaming into a report builder; returns the streamed tokens, the stats and the report.</summary>
    private (List<GeneratedToken> Streamed, GenerationStats Stats, UncertaintyReport Report) Generate(string prompt, GenerationOptions options)
    {
        var stats = new GenerationStats();
        var builder = new UncertaintyReportBuilder(_model.Tokenizer, "tiny-stories", prompt);
        var streamed = new List<GeneratedToken>();
        foreach (var token in _model.Generate(prompt, options, stats))
        {
            streamed.Add(token);
            builder.Add(token);
        }
        return (streamed, stats, builder.Build(stats.FinishReason));
    }

    [Test]
    public void The_report_holds_the_streamed_tokens_and_their_texts_concatenate_to_the_generated_text()
    {
        var (streamed, stats, report) = Generate("Once upon a time", Options(topK: 5, seed: 21));
        var tokens = streamed.Where(t => t.Id >= 0).ToList();
        Assert.Multiple(() =>
        {
            Assert.That(report.Tokens, Has.Count.EqualTo(tokens.Count).And.Count.EqualTo(report.Summary.TokenCount));
            Assert.That(report.Tokens.Select(t => t.Id), Is.EqualTo(tokens.Select(t => t.Id)));
            Assert.That(report.Tokens.Select(t => t.Signals), Is.EqualTo(tokens.Select(t => t.Signals)), "the streamed signals, unchanged");
            Assert.That(report.Text, Is.EqualTo(string.Concat(streamed.Select(t => t.Text))), "no stop string: the report's text is the streamed text");
            Assert.That(report.Summary, Is.EqualTo(stats.Uncertainty), "the summary of exactly the reported tokens");
            Assert.That(report.FinishReason, Is.EqualTo(stats.FinishReason));
            Assert.That(report.Tokens.Select(t => t.Top.Count), Has.All.EqualTo(5));
        });
        foreach (var token in report.Tokens)
        {
            Assert.That(token.Top.Select(a => a.LogProbability), Is.Ordered.Descending, $"token {token.Id}: top list sorted");
            Assert.That(token.Top.Select(a => a.Text), Is.EqualTo(token.Top.Select(a => _model.Tokenizer.Decode([a.Id]))));
        }
    }

    [Test]
    public void With_a_stop_string_the_report_runs_through_the_token_that_completed_it()
    {
        // Greedy "Once upon a time, there was a little girl named Zoe." (golden.json): " girl" completes "irl".
        var options = Options(topK: 2, tokens: 40, stops: ["irl"]) with { Sampling = SamplingOptions.Greedy };
        var (streamed, stats, report) = Generate("Once upon a time", options);
        string shown = string.Concat(streamed.Select(t => t.Text));
        Assert.Multiple(() =>
        {
            Assert.That(stats.FinishReason, Is.EqualTo(FinishReason.StopString));
            Assert.That(shown, Is.EqualTo(", there was a little g"), "the stream leaves the stop string out");
            Assert.That(report.Text, Is.EqualTo(", there was a little girl"), "the report keeps every generated token's text");
            Assert.That(report.Tokens[^1].Text, Is.EqualTo(" girl"));
            Assert.That(report.Tokens, Has.Count.EqualTo(streamed.Count));
        });
    }

    [Test]
    public void Json_has_the_documented_fields_and_the_reports_numbers()
    {
        var (_, stats, report) = Generate("The little cat", Options(topK: 4, seed: 8, tokens: 30));
        using var document = JsonDocument.Parse(report.ToJson());
        var root = document.RootElement;
        Assert.That(root.EnumerateObject().Select(p => p.Name), Is.EqualTo(new[] { "model", "prompt", "text", "tokens", "summary", "finish_reason" }));
        Assert.That(root.GetProperty("model").GetString(), Is.EqualTo("tiny-stories"));
        Assert.That(root.GetProperty("prompt").GetString(), Is.EqualTo("The little cat"));
        Assert.That(root.GetProperty("finish_reason").GetString(), Is.EqualTo(stats.FinishReason == FinishReason.MaxTokens ? "max_tokens" : "end_of_sequence"));
        var tokens = root.GetProperty("tokens").EnumerateArray().ToList();
        Assert.That(tokens, Has.Count.EqualTo(report.Tokens.Count));
        Assert.That(string.Concat(tokens.Select(t => t.GetProperty("text").GetString())), Is.EqualTo(root.GetProperty("text").GetString()));
        for (int i = 0; i < tokens.Count; i++)
        {
            var token = tokens[i];
            var signals = report.Tokens[i].Signals;
            Assert.That(token.EnumerateObject().Select(p => p.Name),
                Is.EqualTo(new[] { "token", "text", "logprob", "prob", "entropy", "kurtosis", "margin", "top" }));
            Assert.That(token.GetProperty("token").GetInt32(), Is.EqualTo(report.Tokens[i].Id));
            Assert.That(token.GetProperty("logprob").GetSingle(), Is.EqualTo(signals.LogProbability), "written round-trip exact");
            Assert.That(token.GetProperty("prob").GetDouble(), Is.EqualTo(Math.Exp(signals.LogProbability)).Within(1e-6));
            Assert.That(token.GetProperty("entropy").GetSingle(), Is.EqualTo(signals.Entropy));
            Assert.That(token.GetProperty("kurtosis").GetSingle(), Is.EqualTo(signals.Kurtosis));
            Assert.That(token.GetProperty("margin").GetSingle(), Is.EqualTo(signals.Margin));
            var top = token.GetProperty("top").EnumerateArray().ToList();
            Assert.That(top, Has.Count.EqualTo(4));
            Assert.That(top.Select(a => a.EnumerateObject().Select(p => p.Name)), Has.All.EqualTo(new[] { "token", "text", "logprob" }));
            Assert.That(top.Select(a => a.GetProperty("logprob").GetDouble()), Is.Ordered.Descending);
            Assert.That(top.Select(a => a.GetProperty("token").GetInt32()), Is.EqualTo(signals.Top.Select(a => a.Id)));
        }
        var summary = root.GetProperty("summary");
        Assert.That(summary.EnumerateObject().Select(p => p.Name),
            Is.EqualTo(new[] { "geometric_mean_prob", "arithmetic_mean_prob", "mean_kurtosis", "mean_entropy", "tokens" }));
        var expected = UncertaintySummary.From(report.Tokens.Select(t => t.Signals));
        Assert.Multiple(() =>
        {
            Assert.That(summary.GetProperty("geometric_mean_prob").GetDouble(), Is.EqualTo(expected.GeometricMeanProbability));
            Assert.That(summary.GetProperty("arithmetic_mean_prob").GetDouble(), Is.EqualTo(expected.ArithmeticMeanProbability));
            Assert.That(summary.GetProperty("mean_kurtosis").GetDouble(), Is.EqualTo(expected.MeanKurtosis));
            Assert.That(summary.GetProperty("mean_entropy").GetDouble(), Is.EqualTo(expected.MeanEntropy));
            Assert.That(summary.GetProperty("tokens").GetInt32(), Is.EqualTo(tokens.Count));
            Assert.That(expected, Is.EqualTo(stats.Uncertainty));
        });
    }

    [Test]
    public void The_first_tokens_numbers_describe_the_distribution_after_the_whole_prompt()
    {
        const string prompt = "Tom and his dog";
        var (_, _, report) = Generate(prompt, Options(topK: 8, seed: 3, tokens: 3));
        var first = report.Tokens[0];
        int[] promptIds = _model.Encode(prompt);

        // Teacher forcing over prompt + first token: the last score is log p(first | whole prompt) and its entropy.
        var score = _model.Score([.. promptIds, first.Id])[^1];
        // And the fused reduction over a direct forward pass's last logits.
        using var session = _model.Model.CreateSession();
        var logits = new float[_model.Config.VocabularySize];
        session.Forward(promptIds, logits);
        var stats = new float[VocabStats.FieldCount];
        var topIds = new int[8];
        var topLogProbs = new float[8];
        VocabStats.ReduceRow(logits, first.Id, [], 8, stats, topIds, topLogProbs);
        Assert.Multiple(() =>
        {
            Assert.That(score.Token, Is.EqualTo(first.Id));
            Assert.That(first.Signals.LogProbability, Is.EqualTo(score.LogProbability).Within(1e-4));
            Assert.That(first.Signals.Entropy, Is.EqualTo(score.Entropy).Within(1e-4));
            Assert.That(first.Signals.LogProbability, Is.EqualTo(stats[(int)VocabStatsField.TokenLogProb]).Within(1e-5));
            Assert.That(first.Signals.Kurtosis, Is.EqualTo(stats[(int)VocabStatsField.Kurtosis]).Within(1e-5 * Math.Abs(stats[(int)VocabStatsField.Kurtosis])));
            Assert.That(first.Signals.Margin, Is.EqualTo(stats[(int)VocabStatsField.Margin]).Within(1e-6));
            Assert.That(first.Top.Select(a => a.Id), Is.EqualTo(topIds));
            Assert.That(first.Top.Select(a => a.LogProbability), Is.EqualTo(topLogProbs).Within(1e-5));
        });
    }

    // ------------------------------------------------------------------ without a model

    private static TokenSignals Signals(int id, float logProbability, float entropy = 1f, params TokenAlternative[] top) =>
        new(id, logProbability, entropy, kurtosis: 100f, margin: 0.5f, maxLogit: 3f, logSumExp: 4f, top);

    private static UncertaintyReport Build(ITextTokenizer tokenizer, string prompt, params TokenSignals[] tokens)
    {
        var builder = new UncertaintyReportBuilder(tokenizer, "test-model", prompt);
        foreach (var signals in tokens)
        {
            builder.Add(new GeneratedToken(signals.Token, "(streamed text is not used)", signals.LogProbability, signals));
        }
        return builder.Build(FinishReason.MaxTokens);
    }

    [Test]
    public void A_character_split_across_tokens_belongs_to_the_token_that_completes_it()
    {
        // "a" "é" (C3 A9) "😀" (F0 9F 98 80), then a lone lead byte E2 when the budget runs out.
        int[] ids = ['a', 0xC3, 0xA9, 0xF0, 0x9F, 0x98, 0x80, 0xE2];
        var tokenizer = new ByteTokenizer();
        var report = Build(tokenizer, "p", [.. ids.Select(id => Signals(id, -0.5f))]);
        Assert.That(report.Tokens.Select(t => t.Text), Is.EqualTo(new[] { "a", "", "é", "", "", "", "😀", "\uFFFD" }));
        Assert.That(report.Text, Is.EqualTo(tokenizer.Decode(ids)));
    }

    [Test]
    public void Non_finite_numbers_are_written_as_null()
    {
        var report = Build(new ByteTokenizer(), "p",
            Signals('x', float.NegativeInfinity, float.NaN, new TokenAlternative('y', -0.1f), new TokenAlternative('x', float.NegativeInfinity)));
        using var document = JsonDocument.Parse(report.ToJson());
        var token = document.RootElement.GetProperty("tokens")[0];
        Assert.Multiple(() =>
        {
            Assert.That(token.GetProperty("logprob").ValueKind, Is.EqualTo(JsonValueKind.Null));
            Assert.That(token.GetProperty("prob").GetDouble(), Is.Zero, "exp(-inf) is a number");
            Assert.That(token.GetProperty("entropy").ValueKind, Is.EqualTo(JsonValueKind.Null));
            Assert.That(token.GetProperty("top")[1].GetProperty("logprob").ValueKind, Is.EqualTo(JsonValueKind.Null));
            Assert.That(document.RootElement.GetProperty("summary").GetProperty("geometric_mean_prob").ValueKind, Is.EqualTo(JsonValueKind.Number));
            Assert.That(document.RootElement.GetProperty("summary").GetProperty("mean_entropy").ValueKind, Is.EqualTo(JsonValueKind.Null));
        });
        Assert.That(UncertaintyReportHtml.Render(report), Does.Contain("class=\"t p-nan h-nan\""), "grey in both colourings");
    }

    [Test]
    public void A_token_without_signals_cannot_be_reported()
    {
        var builder = new UncertaintyReportBuilder(new ByteTokenizer(), "m", "p");
        builder.Add(new GeneratedToken(-1, "held-back tail", float.NaN));
        Assert.That(builder.Count, Is.Zero, "the final held-back piece is no token");
        Assert.That(() => builder.Add(new GeneratedToken(7, "x", -1f)),
            Throws.InvalidOperationException.With.Message.Contains("GenerationOptions.Signals"));
    }

    /// <summary>A report whose every text is hostile HTML: token texts, alternatives, the prompt and the model name.</summary>
    public static UncertaintyReport HostileReport()
    {
        var tokenizer = new ByteTokenizer(
            "<script>document.body.dataset.pwned='script'</script>",
            " & <b>bold</b> &amp;",
            "<img src=x onerror=\"document.body.dataset.pwned='img'\">",
            "\n\n",
            "</script><script>document.body.dataset.pwned='json'</script><!--",
            "\"quoted\" 'single'");
        int first = ByteTokenizer.FirstPiece;
        var report = Build(tokenizer, "Prompt </script><script>document.body.dataset.pwned='prompt'</script> & more",
            Signals(first, -0.05f, 0.2f, new TokenAlternative(first, -0.05f), new TokenAlternative(first + 2, -3f)),
            Signals(first + 1, -1.2f, 2.5f, new TokenAlternative(first + 4, -0.4f), new TokenAlternative(first + 1, -1.2f)),
            Signals(first + 2, -2.5f, 3.1f),
            Signals(first + 3, -0.3f, 0.9f),
            Signals(first + 4, -4f, 4.2f, new TokenAlternative(first + 5, -0.2f)),
            Signals(0xE2, -0.7f, 1.5f),
            Signals(0x82, -0.7f, 1.5f),
            Signals(0xAC, -0.7f, 1.5f),
            Signals(first + 5, float.NegativeInfinity, float.NaN));
        return report with { Model = "model \"<i>x</i>\" & co" };
    }

    [Test]
    public void Html_escapes_every_text_and_the_embedded_json_cannot_close_its_block()
    {
        var report = HostileReport();
        string html = UncertaintyReportHtml.Render(report);
        Assert.Multiple(() =>
        {
            Assert.That(Regex.Matches(html, "<script", RegexOptions.IgnoreCase), Has.Count.EqualTo(2), "the JSON block and the page script only");
            Assert.That(Regex.Matches(html, "</script", RegexOptions.IgnoreCase), Has.Count.EqualTo(2));
            Assert.That(html, Does.Not.Contain("<img").And.Not.Contain("<b>bold").And.Not.Contain("<i>x").And.Not.Contain("<!--"));
            Assert.That(html, Does.Contain("&lt;script&gt;document.body.dataset.pwned=&#39;script&#39;&lt;/script&gt;</span>"));
            Assert.That(html, Does.Contain(" &amp; &lt;b&gt;bold&lt;/b&gt; &amp;amp;</span>"));
            Assert.That(html, Does.Contain("&quot;quoted&quot; &#39;single&#39;</span>"));
            Assert.That(html, Does.Contain("model <b>model &quot;&lt;i&gt;x&lt;/i&gt;&quot; &amp; co</b>"));
            Assert.That(html, Does.Contain("class=\"t nl\""), "the newline token is marked");
            Assert.That(html, Does.Contain("class=\"t empty\""), "the first bytes of € add no text");
            Assert.That(html, Does.Contain(">€</span>"));
        });
        // The title attributes are escaped too: every attribute value is free of raw < and of the quote that closes it.
        foreach (Match title in Regex.Matches(html, "title=\"([^\"]*)\""))
        {
            Assert.That(title.Groups[1].Value, Does.Not.Contain("<").And.Not.Contain(">"));
        }
        // The embedded JSON is the report's JSON.
        var block = Regex.Match(html, "<script type=\"application/json\" id=\"report-data\">(.*?)</script>", RegexOptions.Singleline);
        Assert.That(block.Success, Is.True);
        Assert.That(block.Groups[1].Value, Does.Not.Contain("<").And.Not.Contain(">"));
        Assert.That(JsonNode.DeepEquals(JsonNode.Parse(block.Groups[1].Value), JsonNode.Parse(report.ToJson())), Is.True);
        Assert.That(JsonNode.Parse(block.Groups[1].Value)!["tokens"]![0]!["text"]!.GetValue<string>(), Is.EqualTo(report.Tokens[0].Text));
    }

    [Test]
    public void Html_tooltips_carry_the_numbers_and_the_alternatives()
    {
        string tooltip = UncertaintyReportHtml.Tooltip(HostileReport().Tokens[1]);
        Assert.That(tooltip, Is.EqualTo(
            "token 257 \" & <b>bold</b> &amp;\"\n" +
            "p 0.3012 · log p -1.2000\n" +
            "entropy 2.5000 nats · kurtosis 100.0 · margin 0.5000\n" +
            "top alternatives:\n" +
            "  0.6703  \"</script><script>document.body.dataset.pwned='json'</script><!--\"\n" +
            "  0.3012  \" & <b>bold</b> &amp;\"  (chosen)"));
        Assert.That(UncertaintyReportHtml.Tooltip(HostileReport().Tokens[3]), Does.StartWith("token 259 \"\\n\\n\""));
    }
}

using System.Text.Json;
using KernelLM.Cli;
using KernelLM.Models;
using KernelLM.Models.Llama;
using KernelLM.Tests.Fixtures;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Cli;

/// <summary>`generate --compose / --guidance-* / --contrastive-*`, run in-process with captured output.</summary>
[TestFixture]
public sealed class ComposeCliTests
{
    private const string Prompt = "Once upon a time";
    private string _directory = "";

    [SetUp]
    public void CreateDirectory() => _directory = TestPaths.NewTemporaryDirectory("compose-cli");

    [TearDown]
    public void DeleteDirectory() => Directory.Delete(_directory, recursive: true);

    private static (int ExitCode, string Output, string Errors) Run(params string[] args)
    {
        using var output = new StringWriter();
        using var errors = new StringWriter();
        int exitCode = Program.BuildCommand(output, errors).Parse(args).Invoke();
        return (exitCode, output.ToString(), errors.ToString());
    }

    private static string Text(string output) => output.Split('\n')[0];

    [Test]
    public void Composing_the_model_with_itself_keeps_the_greedy_text_and_reports_the_composed_log_probs()
    {
        string report = Path.Combine(_directory, "composed.json");
        string[] common = ["generate", "--model", TestPaths.TinyStories, "--prompt", Prompt, "--temperature", "0", "--max-tokens", "20", "--device", "cpu"];
        var plain = Run(common);
        var composed = Run([.. common, "--compose", $"{TestPaths.TinyStories}:0.5", "--report", $"json={report}"]);
        Assert.That(composed.ExitCode, Is.Zero, composed.Errors);
        Assert.That(composed.Errors, Does.Contain("[composition: sum: model + 0.5 x"));
        // 1.5 x logits: the same argmax at every step.
        Assert.That(Text(composed.Output), Is.EqualTo(Text(plain.Output)));
        // The report's log-probs are log_softmax(1.5 x logits) of the rows before each token, not the model's own.
        using var model = LanguageModel.Load(TestPaths.TinyStories, new ModelLoadOptions { Device = "cpu", Threads = 2, ContextLength = 64 });
        using var session = model.CreateSession();
        var logits = new float[model.Config.VocabularySize];
        session.Forward(model.Encode(Prompt), logits);
        using var json = JsonDocument.Parse(File.ReadAllText(report));
        double largestDifference = 0;
        foreach (var entry in json.RootElement.GetProperty("tokens").EnumerateArray())
        {
            int token = entry.GetProperty("token").GetInt32();
            double max = logits.Max();
            double composedLogProb = 1.5 * (logits[token] - max) - Math.Log(logits.Sum(x => Math.Exp(1.5 * (x - max))));
            double ownLogProb = logits[token] - max - Math.Log(logits.Sum(x => Math.Exp(x - max)));
            Assert.That(entry.GetProperty("logprob").GetDouble(), Is.EqualTo(composedLogProb).Within(1e-4), $"token {token}");
            largestDifference = Math.Max(largestDifference, Math.Abs(composedLogProb - ownLogProb));
            session.Forward([token], logits);
        }
        Assert.That(largestDifference, Is.GreaterThan(1e-2), "the composed and the model's own distributions differ");
    }

    [Test]
    public void Guidance_with_scale_one_is_the_plain_sampled_text()
    {
        string[] common = ["generate", "--model", TestPaths.TinyStories, "--prompt", Prompt, "--temperature", "0.8", "--seed", "5", "--max-tokens", "30", "--device", "cpu"];
        var plain = Run(common);
        var guided = Run([.. common, "--guidance-negative-prompt", "The end.", "--guidance-scale", "1"]);
        Assert.That(guided.ExitCode, Is.Zero, guided.Errors);
        Assert.That(Text(guided.Output), Is.EqualTo(Text(plain.Output)));
        var stronger = Run([.. common, "--guidance-negative-prompt", "The end.", "--guidance-scale", "4"]);
        Assert.That(stronger.ExitCode, Is.Zero, stronger.Errors);
        Assert.That(Text(stronger.Output), Is.Not.EqualTo(Text(plain.Output)));
    }

    [Test]
    public void Contrastive_decoding_runs_with_an_amateur_of_the_same_tokenizer()
    {
        string amateur = SyntheticModel.Write(Path.Combine(_directory, "amateur"), new SyntheticModelSpec { MaxPositionEmbeddings = 256, Seed = 3 });
        var (exitCode, output, errors) = Run("generate", "--model", TestPaths.TinyStories, "--prompt", Prompt, "--temperature", "0", "--max-tokens", "12",
            "--device", "cpu", "--contrastive-amateur", amateur, "--contrastive-alpha", "0.2");
        Assert.That(exitCode, Is.Zero, errors);
        Assert.That(errors, Does.Contain("contrastive").And.Contain("alpha 0.2"));
        Assert.That(output, Does.StartWith(Prompt).And.Contain("12 tokens"));
    }

    public static IEnumerable<TestCaseData> Errors()
    {
        string tiny = TestPaths.TinyStories;
        yield return new TestCaseData((object)new[] { "--compose", "/nonexistent/module:0.5" }, "--compose", "/nonexistent/module").SetName("compose_error(missing folder)");
        yield return new TestCaseData((object)new[] { "--compose", $"{tiny}:1e39" }, "--compose", "finite").SetName("compose_error(infinite weight)");
        yield return new TestCaseData((object)new[] { "--guidance-scale", "2" }, "--guidance-scale", "--guidance-negative-prompt").SetName("compose_error(scale without a negative prompt)");
        yield return new TestCaseData((object)new[] { "--contrastive-alpha", "0.2" }, "--contrastive-alpha", "--contrastive-amateur").SetName("compose_error(alpha without an amateur)");
        yield return new TestCaseData((object)new[] { "--contrastive-amateur", tiny, "--contrastive-alpha", "0" }, "--contrastive-alpha", "(0, 1]").SetName("compose_error(alpha 0)");
        yield return new TestCaseData((object)new[] { "--compose", tiny, "--guidance-negative-prompt", "x" }, "--compose", "use one").SetName("compose_error(two kinds)");
        yield return new TestCaseData((object)new[] { "--compose", tiny, "--draft-model", tiny, "--route-entropy", "1" }, "--draft-model", "composition")
            .SetName("compose_error(with routing)");
        yield return new TestCaseData((object)new[] { "--compose", tiny, "--adaptive-decoding", "threshold=1" }, "--adaptive-decoding", "composition")
            .SetName("compose_error(with adaptive decoding)");
    }

    [TestCaseSource(nameof(Errors))]
    public void Bad_composition_options_are_one_line_errors_before_loading(string[] options, string option, string mentioned)
    {
        var (exitCode, _, errors) = Run(["generate", "--model", TestPaths.TinyStories, "--prompt", Prompt, "--device", "cpu", .. options]);
        Assert.That(exitCode, Is.EqualTo(1));
        Assert.That(errors.Trim().Split('\n'), Has.Length.EqualTo(1), errors);
        Assert.That(errors, Does.StartWith($"error: invalid {option}").And.Contain(mentioned));
    }

    [Test]
    public void A_module_with_another_tokenizer_is_refused()
    {
        string other = SyntheticModel.Write(Path.Combine(_directory, "other"), new SyntheticModelSpec { MaxPositionEmbeddings = 256 });
        File.WriteAllText(Path.Combine(other, "tokenizer_config.json"), """{ "add_bos_token": false }""");
        var (exitCode, _, errors) = Run("generate", "--model", TestPaths.TinyStories, "--prompt", Prompt, "--device", "cpu", "--compose", other);
        Assert.That(exitCode, Is.EqualTo(1));
        Assert.That(errors, Does.StartWith("error: invalid compose:").And.Contain(other).And.Contain("add_bos_token"));
    }
}

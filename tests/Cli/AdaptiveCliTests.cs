using System.Text.Json;
using KernelLM.Cli;
using KernelLM.Runtime.Generation;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Cli;

/// <summary>`calibrate-entropy`, `--adaptive-decoding` and `--draft-model/--route-entropy`, run in-process with captured output.</summary>
[TestFixture]
public sealed class AdaptiveCliTests
{
    private string _directory = "";
    private string _model = "";
    private string _input = "";

    private static (int ExitCode, string Output, string Errors) Run(params string[] args)
    {
        using var output = new StringWriter();
        using var errors = new StringWriter();
        int exitCode = Program.BuildCommand(output, errors).Parse(args).Invoke();
        return (exitCode, output.ToString(), errors.ToString());
    }

    /// <summary>A copy of tiny-stories (the threshold file goes beside it) and the 50 sample stories as JSONL.</summary>
    [OneTimeSetUp]
    public void CopyModel()
    {
        _directory = TestPaths.NewTemporaryDirectory("adaptive-cli");
        _model = Path.Combine(_directory, "tiny-stories");
        Directory.CreateDirectory(_model);
        // Without the shipped threshold: the tests calibrate their own.
        foreach (string file in Directory.GetFiles(TestPaths.TinyStories).Where(f => Path.GetFileName(f) != EntropyCalibration.FileName))
        {
            File.Copy(file, Path.Combine(_model, Path.GetFileName(file)));
        }
        _input = Path.Combine(_directory, "stories.jsonl");
        File.WriteAllLines(_input, File.ReadLines(Path.Combine(TestPaths.TinyStories, "corpus", "sample_stories.txt"))
            .Where(line => line.Length > 0).Select(line => JsonSerializer.Serialize(new { text = line })));
    }

    [OneTimeTearDown]
    public void DeleteCopy() => Directory.Delete(_directory, recursive: true);

    private string[] Generate(params string[] extra) =>
        ["generate", "--model", _model, "--prompt", "Once upon a time", "--max-tokens", "40", "--device", "cpu", .. extra];

    [Test, Order(1)]
    public void Auto_without_a_calibration_is_an_error_naming_the_file()
    {
        var (exitCode, _, errors) = Run(Generate("--adaptive-decoding"));
        Assert.That(exitCode, Is.EqualTo(1));
        Assert.That(errors, Does.Contain(EntropyCalibration.FileName).And.Contain("calibrate-entropy"));
    }

    [Test, Order(2)]
    public void Calibrate_entropy_saves_the_threshold_that_auto_then_uses()
    {
        var (exitCode, output, errors) = Run("calibrate-entropy", "--model", _model, "--input", _input, "--device", "cpu");
        Assert.That(exitCode, Is.Zero, errors);
        string path = EntropyCalibration.PathFor(_model);
        var saved = EntropyCalibration.Read(path);
        Assert.That(output, Does.Contain($"entropy threshold: {saved.Threshold:F4} nats"));
        Assert.That(errors, Does.Contain($"saved {path}"));
        Assert.That(saved.Texts, Is.EqualTo(50));
        Assert.That(saved.HeldOutAccuracy, Is.GreaterThan(saved.GreedyCorrectFraction - 1e-9), "the threshold does at least as well as always trusting greedy");
        Assert.That(saved.Threshold, Is.GreaterThan(0));

        (exitCode, output, errors) = Run(Generate("--adaptive-decoding"));
        Assert.That(exitCode, Is.Zero, errors);
        Assert.That(output, Does.Match($@"\[adaptive decoding: threshold {saved.Threshold:F3} nats, lookahead at \d+ of \d+ steps \(beams 3, lookahead 5\)"));
    }

    [Test]
    public void Run_with_adaptive_decoding_uses_the_threshold_shipped_with_the_embedded_model()
    {
        var (exitCode, output, errors) = Run("run", "--max-tokens", "30", "--adaptive-decoding", "--device", "cpu");
        Assert.That(exitCode, Is.Zero, errors);
        Assert.That(output, Does.Contain("[adaptive decoding: threshold 1.038 nats"));
    }

    [Test]
    public void Threshold_zero_looks_ahead_at_every_step()
    {
        var (exitCode, output, errors) = Run(Generate("--adaptive-decoding", "threshold=0", "beams=2", "lookahead=2"));
        Assert.That(exitCode, Is.Zero, errors);
        var match = System.Text.RegularExpressions.Regex.Match(output, @"lookahead at (\d+) of (\d+) steps \(beams 2, lookahead 2\)");
        Assert.That(match.Success, Is.True, output);
        Assert.That(match.Groups[1].Value, Is.EqualTo(match.Groups[2].Value));
    }

    [TestCase("beams=1", "beams")]
    [TestCase("lookahead=0", "lookahead")]
    [TestCase("threshold=-1", "threshold")]
    [TestCase("threshold=x", "threshold")]
    [TestCase("width=3", "unknown setting 'width'")]
    [TestCase("beams", "has no '='")]
    public void Bad_adaptive_settings_are_one_line_errors(string setting, string message)
    {
        var (exitCode, output, errors) = Run(Generate("--adaptive-decoding", setting));
        Assert.That(exitCode, Is.EqualTo(1));
        Assert.That(errors, Does.StartWith("error: ").And.Contain(message));
        Assert.That(output, Is.Empty, "nothing generated");
    }

    [Test]
    public void Adaptive_decoding_refuses_an_explicit_temperature_and_routing()
    {
        var (exitCode, _, errors) = Run(Generate("--adaptive-decoding", "threshold=1", "--temperature", "0.7"));
        Assert.That(exitCode, Is.EqualTo(1));
        Assert.That(errors, Does.Contain("temperature"));
        (exitCode, _, errors) = Run(Generate("--adaptive-decoding", "threshold=1", "--draft-model", _model, "--route-entropy", "1"));
        Assert.That(exitCode, Is.EqualTo(1));
        Assert.That(errors, Does.Contain("--draft-model"));
    }

    [Test]
    public void Routing_with_a_copy_of_the_model_prints_the_plain_text_and_the_token_counts()
    {
        var (exitCode, plain, errors) = Run("generate", "--model", _model, "--prompt", "Once upon a time", "--max-tokens", "12", "--device", "cpu", "--temperature", "0");
        Assert.That(exitCode, Is.Zero, errors);
        var (routedExit, routed, routedErrors) = Run("generate", "--model", TestPaths.TinyStories, "--prompt", "Once upon a time", "--max-tokens", "12",
            "--device", "cpu", "--temperature", "0", "--draft-model", _model, "--route-entropy", "0.5");
        Assert.That(routedExit, Is.Zero, routedErrors);
        Assert.That(routed.Split('\n')[0], Is.EqualTo(plain.Split('\n')[0]), "12 tokens: before golden.json's near tie at step 13");
        Assert.That(routed, Does.Match(@"\[routing: small model \d+ tokens, large model \d+ tokens \(0 after a delimiter; \d+ tokens prefilled to catch up\)\]"));
    }

    [Test]
    public void The_delimiter_trigger_hands_the_next_tokens_to_the_large_model()
    {
        var (exitCode, output, errors) = Run("generate", "--model", TestPaths.TinyStories, "--prompt", "Once upon a time", "--max-tokens", "30",
            "--device", "cpu", "--temperature", "0", "--draft-model", _model, "--route-entropy", "100", "--route-after", ".", "--route-tokens", "2");
        Assert.That(exitCode, Is.Zero, errors);
        var match = System.Text.RegularExpressions.Regex.Match(output, @"large model (\d+) tokens \((\d+) after a delimiter");
        Assert.That(match.Success, Is.True, output);
        Assert.That(match.Groups[2].Value, Is.EqualTo(match.Groups[1].Value), "entropy 100 never hands over: every large token follows a '.'");
        Assert.That(int.Parse(match.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture), Is.GreaterThanOrEqualTo(2));
    }

    [Test]
    public void Routing_options_are_checked_before_loading()
    {
        var (code, _, message) = Run(Generate("--draft-model", _model, "--route-entropy", "1", "--route-after", "\\n\\n"));
        Assert.That(code, Is.EqualTo(1));
        Assert.That(message, Does.Contain("--route-after and --route-tokens go together"));
        var (exitCode, _, errors) = Run(Generate("--route-entropy", "1"));
        Assert.That((exitCode, errors), Is.EqualTo((1, "error: invalid --route-entropy: goes with --draft-model" + Environment.NewLine)));
        (exitCode, _, errors) = Run(Generate("--draft-model", _model));
        Assert.That(exitCode, Is.EqualTo(1));
        Assert.That(errors, Does.Contain("--route-entropy"));
        (exitCode, _, errors) = Run(Generate("--draft-model", Path.Combine(_directory, "missing"), "--route-entropy", "1"));
        Assert.That(exitCode, Is.EqualTo(1));
        Assert.That(errors, Does.Contain("no such folder"));
    }

    [Test]
    public void Calibrate_entropy_refuses_bad_input_naming_the_line_and_writes_nothing()
    {
        string input = Path.Combine(_directory, "bad.jsonl");
        string output = Path.Combine(_directory, "out.json");
        File.WriteAllLines(input, ["{\"text\": \"Once upon a time\"}", "", "{\"body\": \"x\"}"]);
        var (exitCode, _, errors) = Run("calibrate-entropy", "--model", _model, "--input", input, "--output", output);
        Assert.That(exitCode, Is.EqualTo(1));
        Assert.That(errors, Does.Contain("line 3").And.Contain("\"text\""));
        Assert.That(File.Exists(output), Is.False);
        File.WriteAllLines(input, ["{\"text\": \"Once upon a time\"", ""]);
        (exitCode, _, errors) = Run("calibrate-entropy", "--model", _model, "--input", input, "--output", output);
        Assert.That(exitCode, Is.EqualTo(1));
        Assert.That(errors, Does.Contain("line 1").And.Contain("invalid JSON"));
        (exitCode, _, errors) = Run("calibrate-entropy", "--model", _model, "--input", Path.Combine(_directory, "none.jsonl"));
        Assert.That(exitCode, Is.EqualTo(1));
        Assert.That(errors, Does.Contain("no such file"));
        Assert.That(File.Exists(output), Is.False);
    }
}

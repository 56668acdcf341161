using System.Text.Json;
using KernelLM.Cli;
using KernelLM.Models;
using KernelLM.Models.Llama;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Cli;

/// <summary>`kernellm score --input IN.jsonl --output OUT.jsonl`, run in-process with captured stdout / stderr.</summary>
[TestFixture]
public sealed class ScoreCommandTests
{
    /// <summary>A small context makes "too long" cheap to reach.</summary>
    private const int Context = 32;

    private const string LongText = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her dog, Max. "
        + "One day, Lily saw a big red ball under a tree.";

    private string _directory = "";

    [SetUp]
    public void CreateDirectory() => _directory = TestPaths.NewTemporaryDirectory("score-cli");

    [TearDown]
    public void DeleteDirectory() => Directory.Delete(_directory, recursive: true);

    private static (int ExitCode, string Output, string Errors) Run(params string[] args)
    {
        using var output = new StringWriter();
        using var errors = new StringWriter();
        int exitCode = Program.BuildCommand(output, errors).Parse(args).Invoke();
        return (exitCode, output.ToString(), errors.ToString());
    }

    private string Input(params string[] lines)
    {
        string path = Path.Combine(_directory, "in.jsonl");
        File.WriteAllText(path, string.Join('\n', lines) + "\n");
        return path;
    }

    private static JsonElement[] ReadLines(string path) =>
        [.. File.ReadAllLines(path).Select(line => JsonDocument.Parse(line).RootElement.Clone())];

    private static float[] Floats(JsonElement array) => [.. array.EnumerateArray().Select(e => e.GetSingle())];

    [Test]
    public void Mixed_good_and_malformed_lines_score_in_order_with_error_lines_and_exit_code_1()
    {
        string input = Input(
            """{"id": "first", "text": "The little cat sat on the mat."}""",
            "",
            """{"text": "not closed""",
            """{"id": 3, "body": "no text field"}""",
            $$"""{"id": {"doc": 4}, "text": "{{LongText}}"}""",
            """{"text": 17}""",
            "   ",
            """{"id": "empty", "text": ""}""",
            """[1, 2]""",
            """{"text": "Once upon a time"}""");
        string output = Path.Combine(_directory, "out.jsonl");
        var (exitCode, stdout, errors) = Run("score", "--model", TestPaths.TinyStories, "--input", input, "--output", output,
            "--context-length", $"{Context}", "--threads", "2");

        Assert.That(exitCode, Is.EqualTo(1), errors);
        Assert.That(stdout, Is.Empty);
        var lines = ReadLines(output);
        Assert.That(lines.Select(l => l.GetProperty("line").GetInt32()), Is.EqualTo(new[] { 1, 3, 4, 5, 6, 8, 9, 10 }), "one output line per non-blank input line, in order");

        using var model = LanguageModel.Load(TestPaths.TinyStories, new ModelLoadOptions { Threads = 2, ContextLength = Context });
        int longTokens = model.Encode(LongText).Length;
        var expectedErrors = new Dictionary<int, string>
        {
            [3] = "invalid JSON",
            [4] = "no \"text\" field",
            [5] = $"the text is {longTokens} tokens; the context holds {Context}",
            [6] = "\"text\" is a number, not a string",
            [8] = "encodes to 1 token(s); scoring needs at least 2",
            [9] = "not an object",
        };
        using (Assert.EnterMultipleScope())
        {
            foreach (var line in lines)
            {
                int number = line.GetProperty("line").GetInt32();
                if (expectedErrors.TryGetValue(number, out string? error))
                {
                    Assert.That(line.GetProperty("error").GetString(), Does.Contain(error), $"line {number}");
                    Assert.That(line.TryGetProperty("tokens", out _), Is.False, $"line {number}: an error line has no scores");
                    Assert.That(errors, Does.Contain($"line {number}: ").And.Contain(error));
                }
                else
                {
                    Assert.That(line.TryGetProperty("error", out _), Is.False, $"line {number}");
                }
            }
            Assert.That(errors, Does.Contain("scored 2 of 8 lines").And.Contain("6 line(s) failed"));
        }

        // ids are copied as given (string, number, object), also onto error lines.
        Assert.That(lines[0].GetProperty("id").GetString(), Is.EqualTo("first"));
        Assert.That(lines[2].GetProperty("id").GetInt32(), Is.EqualTo(3));
        Assert.That(lines[3].GetProperty("id").GetProperty("doc").GetInt32(), Is.EqualTo(4));
        Assert.That(lines[5].GetProperty("id").GetString(), Is.EqualTo("empty"));
        Assert.That(lines[7].TryGetProperty("id", out _), Is.False);

        // The good lines carry the scorer's numbers.
        foreach (var (line, text) in new[] { (lines[0], "The little cat sat on the mat."), (lines[7], "Once upon a time") })
        {
            int[] ids = model.Encode(text);
            var scores = model.Score(ids);
            Assert.That(line.GetProperty("tokens").EnumerateArray().Select(e => e.GetInt32()), Is.EqualTo(ids));
            Assert.That(Floats(line.GetProperty("logprobs")), Is.EqualTo(scores.Select(s => s.LogProbability)));
            Assert.That(Floats(line.GetProperty("entropies")), Is.EqualTo(scores.Select(s => s.Entropy)));
            Assert.That(Floats(line.GetProperty("kurtosis")), Is.EqualTo(scores.Select(s => s.Kurtosis)));
            Assert.That(Floats(line.GetProperty("margins")), Is.EqualTo(scores.Select(s => s.Margin)));
            double sum = scores.Sum(s => (double)s.LogProbability);
            Assert.That(line.GetProperty("sum_logprob").GetDouble(), Is.EqualTo(sum).Within(1e-9));
            Assert.That(line.GetProperty("perplexity").GetDouble(), Is.EqualTo(Math.Exp(-sum / scores.Count)).Within(1e-9));
            Assert.That(line.GetProperty("mean_entropy").GetDouble(), Is.EqualTo(scores.Average(s => (double)s.Entropy)).Within(1e-9));
            Assert.That(line.TryGetProperty("kl_pq", out _), Is.False, "no reference, no KL");
            Assert.That(line.TryGetProperty("top_ids", out _), Is.False, "no --top-k, no alternatives");
        }
        Assert.That(Directory.GetFiles(_directory).Select(Path.GetFileName), Is.EquivalentTo(new[] { "in.jsonl", "out.jsonl" }), "no temporary file left");
    }

    [Test]
    public void All_lines_scored_against_a_reference_with_top_k_and_a_custom_field_exit_0()
    {
        string input = Input("""{"id": 1, "body": "The little cat sat on the mat."}""", """{"id": 2, "body": "Once upon a time"}""");
        string output = Path.Combine(_directory, "out.jsonl");
        var (exitCode, _, errors) = Run("score", "-m", TestPaths.TinyStories, "--reference", TestPaths.TinyStories, "-i", input, "-o", output,
            "--field", "body", "--top-k", "3", "--threads", "2");
        Assert.That(exitCode, Is.Zero, errors);
        Assert.That(errors, Does.Contain("scored 2 of 2 lines").And.Contain("with the reference model").And.Not.Contain("failed"));
        var lines = ReadLines(output);
        Assert.That(lines.Select(l => l.GetProperty("id").GetInt32()), Is.EqualTo(new[] { 1, 2 }));
        foreach (var line in lines)
        {
            int positions = line.GetProperty("tokens").GetArrayLength() - 1;
            foreach (string column in new[] { "logprobs", "entropies", "kurtosis", "margins", "kl_pq", "kl_qp", "log_ratio", "top_ids", "top_logprobs" })
            {
                Assert.That(line.GetProperty(column).GetArrayLength(), Is.EqualTo(positions), column);
            }
            // The same model as its own reference: KL and log-ratio exactly 0.
            Assert.That(Floats(line.GetProperty("kl_pq")), Is.All.Zero);
            Assert.That(Floats(line.GetProperty("kl_qp")), Is.All.Zero);
            Assert.That(Floats(line.GetProperty("log_ratio")), Is.All.Zero);
            Assert.That(line.GetProperty("mean_kl_pq").GetDouble(), Is.Zero);
            Assert.That(line.GetProperty("mean_kl_qp").GetDouble(), Is.Zero);
            Assert.That(line.GetProperty("sum_log_ratio").GetDouble(), Is.Zero);
            Assert.That(line.GetProperty("top_ids").EnumerateArray().Select(a => a.GetArrayLength()), Is.All.EqualTo(3));
        }
    }

    [Test]
    public void A_command_that_fails_before_scoring_writes_no_output_and_leaves_no_temporary_file()
    {
        string input = Input("""{"text": "The little cat"}""");
        string output = Path.Combine(_directory, "out.jsonl");
        var (exitCode, _, errors) = Run("score", "--model", "/nonexistent/model", "--input", input, "--output", output);
        Assert.That(exitCode, Is.EqualTo(1));
        Assert.That(errors, Does.StartWith("error: ").And.Contain("/nonexistent/model"));
        Assert.That(Directory.GetFiles(_directory).Select(Path.GetFileName), Is.EquivalentTo(new[] { "in.jsonl" }));

        // An existing OUT is left as it was (the rename is the only write to it).
        File.WriteAllText(output, "previous results\n");
        (exitCode, _, errors) = Run("score", "--model", TestPaths.TinyStories, "--reference", "/nonexistent/reference", "--input", input, "--output", output);
        Assert.That(exitCode, Is.EqualTo(1));
        Assert.That(errors, Does.Contain("/nonexistent/reference"));
        Assert.That(File.ReadAllText(output), Is.EqualTo("previous results\n"));
        Assert.That(Directory.GetFiles(_directory).Select(Path.GetFileName), Is.EquivalentTo(new[] { "in.jsonl", "out.jsonl" }));
    }

    [TestCase(new[] { "--text", "x", "--input", "in.jsonl", "--output", "out.jsonl" }, "exactly one")]
    [TestCase(new string[0], "exactly one")]
    [TestCase(new[] { "--input", "in.jsonl" }, "--input and --output go together")]
    [TestCase(new[] { "--text", "x", "--output", "out.jsonl" }, "--input and --output go together")]
    [TestCase(new[] { "--input", "missing.jsonl", "--output", "out.jsonl" }, "missing.jsonl: no such file")]
    [TestCase(new[] { "--text", "x y", "--top-k", "17" }, "top-k")]
    public void Bad_options_are_one_clear_line(string[] options, string mentioned)
    {
        Input("""{"text": "The little cat"}""");
        string[] paths = [.. options.Select(o => o.EndsWith(".jsonl", StringComparison.Ordinal) ? Path.Combine(_directory, o) : o)];
        var (exitCode, _, errors) = Run(["score", "--model", TestPaths.TinyStories, .. paths]);
        Assert.That(exitCode, Is.EqualTo(1));
        var lines = errors.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.That(lines, Has.Length.EqualTo(1), errors);
        Assert.That(lines[0], Does.StartWith("error: ").And.Contains(mentioned));
        Assert.That(File.Exists(Path.Combine(_directory, "out.jsonl")), Is.False);
    }
}

using System.Text.Json;
using KernelLM.Cli;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Cli;

/// <summary>The `kernellm` commands, run in-process with captured output.</summary>
[TestFixture]
public sealed class CliTests
{
    private static (int ExitCode, string Output, string Errors) Run(params string[] args)
    {
        using var output = new StringWriter();
        using var errors = new StringWriter();
        int exitCode = Program.BuildCommand(output, errors).Parse(args).Invoke();
        return (exitCode, output.ToString(), errors.ToString());
    }

    [Test]
    public void Run_generates_a_story_from_the_embedded_model_and_reports_tokens_per_second()
    {
        var (exitCode, output, errors) = Run("run", "--max-tokens", "40", "--seed", "3");
        Assert.That(exitCode, Is.Zero, errors);
        Assert.That(output, Does.StartWith(Program.DefaultPrompt));
        Assert.That(output, Does.Match(@"decode \d+(\.\d+)? tokens/s"));
        string story = output.Split('\n')[0];
        Assert.That(story.Length, Is.GreaterThan(Program.DefaultPrompt.Length + 40), "forty tokens of story text");
    }

    [Test]
    public void Generate_greedy_is_the_golden_continuation()
    {
        var (exitCode, output, errors) = Run("generate", "--model", TestPaths.TinyStories, "--prompt", "Once upon a time",
            "--temperature", "0", "--max-tokens", "13", "--device", "cpu");
        Assert.That(exitCode, Is.Zero, errors);
        Assert.That(output, Does.StartWith("Once upon a time, there was a little girl named Zoe. She loved to play"), "13 tokens: step 13 is a near tie in golden.json");
    }

    [Test]
    public void Generate_stops_at_a_stop_string()
    {
        var (exitCode, output, _) = Run("generate", "-m", TestPaths.TinyStories, "-p", "Once upon a time", "-t", "0", "--stop", "Zoe", "--stop", "girl");
        Assert.That(exitCode, Is.Zero);
        Assert.That(output.Split('\n')[0], Is.EqualTo("Once upon a time, there was a little "));
        Assert.That(output, Does.Contain("StopString"));
    }

    [Test]
    public void Score_json_prints_one_object_per_position()
    {
        var (exitCode, output, errors) = Run("score", "--model", TestPaths.TinyStories, "--text", "The little cat", "--json");
        Assert.That(exitCode, Is.Zero, errors);
        var lines = output.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        // "The little cat" is [bos, The, little, cat]: positions 1..3.
        Assert.That(lines, Has.Length.EqualTo(3));
        for (int i = 0; i < lines.Length; i++)
        {
            using var line = JsonDocument.Parse(lines[i]);
            var root = line.RootElement;
            Assert.That(root.EnumerateObject().Select(p => p.Name), Is.EqualTo(new[] { "position", "token", "logprob", "entropy", "kurtosis", "margin" }));
            Assert.That(root.GetProperty("position").GetInt32(), Is.EqualTo(i + 1));
            Assert.That(root.GetProperty("logprob").GetDouble(), Is.LessThanOrEqualTo(0));
            Assert.That(root.GetProperty("entropy").GetDouble(), Is.InRange(0, Math.Log(2048)));
        }
        var tokens = lines.Select(l => JsonDocument.Parse(l).RootElement.GetProperty("token").GetInt32()).ToArray();
        using var model = KernelLM.Models.LanguageModel.Load(TestPaths.TinyStories);
        Assert.That(tokens, Is.EqualTo(model.Encode("The little cat").Skip(1)));
    }

    [Test]
    public void Info_prints_architecture_sizes_and_dtypes()
    {
        var (exitCode, output, errors) = Run("info", TestPaths.TinyStories);
        Assert.That(exitCode, Is.Zero, errors);
        Assert.That(output, Does.Contain("LlamaForCausalLM"));
        Assert.That(output, Does.Contain("BF16 x56"));
        Assert.That(output, Does.Contain("5,246,208"));
        Assert.That(output, Does.Contain("8 (kv heads 4, group 2, head_dim 32)"));
    }

    [Test]
    public void Info_on_the_emulated_device_reports_device_memory_and_engine()
    {
        var (exitCode, output, errors) = Run("info", TestPaths.TinyStories, "--device", "cuda-emulated", "--context-length", "64");
        Assert.That(exitCode, Is.Zero, errors);
        // The table wraps long values: read it as one line of words.
        string flat = System.Text.RegularExpressions.Regex.Replace(output.Replace('│', ' '), @"\s+", " ");
        Assert.That(flat, Does.Contain("device memory used"));
        Assert.That(flat, Does.Contain("CUDA graphs (one per context bound)"));
        Assert.That(flat, Does.Contain("built-in GEMM"));
        Assert.That(flat, Does.Match(@"upload: 10\.\d MB through pinned staging"));
    }

    [TestCase(new[] { "generate", "--model", "/nonexistent/model", "--prompt", "x" }, "/nonexistent/model")]
    [TestCase(new[] { "run", "--temperature", "-1" }, "temperature")]
    [TestCase(new[] { "run", "--top-p", "0" }, "top-p")]
    [TestCase(new[] { "run", "--max-tokens", "0" }, "max-tokens")]
    [TestCase(new[] { "run", "--device", "quantum" }, "device")]
    [TestCase(new[] { "score", "--model", "/nonexistent/model", "--text", "x" }, "/nonexistent/model")]
    public void Errors_are_one_clear_line_and_a_nonzero_exit(string[] args, string mentioned)
    {
        var (exitCode, _, errors) = Run(args);
        Assert.That(exitCode, Is.EqualTo(1));
        var lines = errors.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.That(lines, Has.Length.EqualTo(1), errors);
        Assert.That(lines[0], Does.StartWith("error: ").And.Contains(mentioned));
    }

    [Test]
    public void Verbose_errors_carry_the_stack_trace()
    {
        var (exitCode, _, errors) = Run("generate", "--model", "/nonexistent/model", "--prompt", "x", "--verbose");
        Assert.That(exitCode, Is.EqualTo(1));
        Assert.That(errors, Does.Contain("   at "));
    }
}

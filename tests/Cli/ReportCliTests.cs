using System.Text.Json;
using KernelLM.Cli;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Cli;

/// <summary>`--report html=PATH` / `--report json=PATH` on run and generate, in-process with captured output.</summary>
[TestFixture]
public sealed class ReportCliTests
{
    private string _folder = null!;

    [SetUp]
    public void SetUp() => _folder = TestPaths.NewTemporaryDirectory("report-cli");

    [TearDown]
    public void TearDown() => Directory.Delete(_folder, recursive: true);

    private static (int ExitCode, string Output, string Errors) Run(params string[] args)
    {
        using var output = new StringWriter();
        using var errors = new StringWriter();
        int exitCode = Program.BuildCommand(output, errors).Parse(args).Invoke();
        return (exitCode, output.ToString(), errors.ToString());
    }

    [Test]
    public void Generate_writes_both_reports_of_what_it_printed()
    {
        string json = Path.Combine(_folder, "report.json");
        string html = Path.Combine(_folder, "report.html");
        var (exitCode, output, errors) = Run("generate", "--model", TestPaths.TinyStories, "--prompt", "The little cat", "--seed", "4",
            "--max-tokens", "25", "--report", $"json={json}", "--report", $"html={html}", "--device", "cpu");
        Assert.That(exitCode, Is.Zero, errors);
        Assert.That(errors, Does.Contain($"report (json): {json}").And.Contain($"report (html): {html}"));
        using var document = JsonDocument.Parse(File.ReadAllBytes(json));
        var root = document.RootElement;
        var tokens = root.GetProperty("tokens").EnumerateArray().ToList();
        string text = root.GetProperty("text").GetString()!;
        Assert.Multiple(() =>
        {
            Assert.That(root.GetProperty("model").GetString(), Is.EqualTo("tiny-stories"));
            Assert.That(root.GetProperty("prompt").GetString(), Is.EqualTo("The little cat"));
            Assert.That(output, Does.StartWith("The little cat" + text + "\n"), "the report's text is the printed text (no stop string)");
            Assert.That(output, Does.Contain($"[{tokens.Count} tokens,").Or.Contain($"[{tokens.Count + 1} tokens,"), "the printed count (an EOS is counted, not reported)");
            Assert.That(tokens.Select(t => t.GetProperty("top").GetArrayLength()), Has.All.EqualTo(ReportOptions.DefaultTopK));
            Assert.That(root.GetProperty("summary").GetProperty("tokens").GetInt32(), Is.EqualTo(tokens.Count));
            Assert.That(File.ReadAllText(html), Does.StartWith("<!DOCTYPE html>").And.Contain("<span class=\"t"));
            Assert.That(Directory.GetFiles(_folder), Is.EquivalentTo(new[] { json, html }), "no temporary file is left behind");
        });
    }

    [Test]
    public void Run_takes_reports_too_and_replaces_an_existing_file()
    {
        string json = Path.Combine(_folder, "story.json");
        File.WriteAllText(json, "old contents");
        var (exitCode, _, errors) = Run("run", "--max-tokens", "8", "--seed", "1", "--report", $"json={json}", "--report-top-k", "0");
        Assert.That(exitCode, Is.Zero, errors);
        using var document = JsonDocument.Parse(File.ReadAllBytes(json));
        var tokens = document.RootElement.GetProperty("tokens").EnumerateArray().ToList();
        Assert.That(tokens, Is.Not.Empty);
        Assert.That(tokens.Select(t => t.GetProperty("top").GetArrayLength()), Has.All.Zero);
        Assert.That(Directory.GetFiles(_folder), Is.EqualTo(new[] { json }));
    }

    [Test]
    public void A_relative_path_is_resolved_against_the_working_directory()
    {
        string previous = Environment.CurrentDirectory;
        try
        {
            Environment.CurrentDirectory = _folder;
            var (exitCode, _, errors) = Run("run", "--max-tokens", "4", "--seed", "1", "--report", "html=relative.html");
            Assert.That(exitCode, Is.Zero, errors);
        }
        finally
        {
            Environment.CurrentDirectory = previous;
        }
        Assert.That(File.Exists(Path.Combine(_folder, "relative.html")), Is.True);
    }

    // Every case names a model folder that does not exist: the error is about --report, so it came before the load.
    [TestCase("pdf=x.pdf", "unknown format 'pdf'")]
    [TestCase("report.html", "has no '='")]
    [TestCase("html=", "the path is empty")]
    [TestCase("json=/nonexistent-folder/report.json", "the folder /nonexistent-folder does not exist")]
    [TestCase("json=/proc/report.json", "cannot write in /proc")]
    [TestCase("html=/tmp", "/tmp is a folder")]
    public void Bad_report_values_are_one_line_naming_the_option_before_the_model_loads(string value, string detail)
    {
        var (exitCode, _, errors) = Run("generate", "--model", "/nonexistent/model", "--prompt", "x", "--report", value);
        Assert.That(exitCode, Is.EqualTo(1));
        var lines = errors.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.That(lines, Has.Length.EqualTo(1), errors);
        Assert.That(lines[0], Does.StartWith("error: invalid --report: ").And.Contain(detail));
    }

    [TestCase("-1")]
    [TestCase("17")]
    public void Report_top_k_is_checked(string topK)
    {
        var (exitCode, _, errors) = Run("run", "--report", $"json={Path.Combine(_folder, "r.json")}", "--report-top-k", topK);
        Assert.That(exitCode, Is.EqualTo(1));
        Assert.That(errors.Trim(), Is.EqualTo($"error: invalid --report-top-k: {topK} (must be 0..16)"));
    }

    [Test]
    public void The_same_path_twice_is_an_error()
    {
        string path = Path.Combine(_folder, "r.json");
        var (exitCode, _, errors) = Run("run", "--report", $"json={path}", "--report", $"html={path}");
        Assert.That(exitCode, Is.EqualTo(1));
        Assert.That(errors, Does.StartWith("error: invalid --report: ").And.Contain("named twice"));
    }
}

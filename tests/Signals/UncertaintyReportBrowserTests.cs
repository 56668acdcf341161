using System.Text.RegularExpressions;
using KernelLM.Models;
using KernelLM.Models.Llama;
using KernelLM.Runtime.Generation;
using KernelLM.Runtime.Sampling;
using KernelLM.Runtime.Signals;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Signals;

/// <summary>
/// The HTML report in a real browser (headless Chromium): its script runs, every token is a span, the page paints
/// coloured tokens in both colourings, and hostile token text stays text. Skipped, with the reason, where Chromium
/// is not installed; `bash .ci/run` installs it.
/// </summary>
[TestFixture]
public sealed class UncertaintyReportBrowserTests
{
    private string _folder = null!;

    [OneTimeSetUp]
    public void SetUp() => _folder = TestPaths.NewTemporaryDirectory("report-browser");

    [OneTimeTearDown]
    public void TearDown() => Directory.Delete(_folder, recursive: true);

    private string WritePage(UncertaintyReport report, string name)
    {
        string path = Path.Combine(_folder, name);
        File.WriteAllText(path, UncertaintyReportHtml.Render(report));
        return path;
    }

    private static UncertaintyReport GeneratedReport()
    {
        using var model = LanguageModel.Load(TestPaths.TinyStories, new ModelLoadOptions { Threads = 2, ContextLength = 256 });
        const string prompt = "Once upon a time";
        var options = new GenerationOptions
        {
            MaxNewTokens = 60,
            Sampling = new SamplingOptions { Temperature = 1.0f, TopK = 40, TopP = 0.95f, Seed = 12 },
            Signals = new TokenSignalOptions { TopK = 5 },
        };
        var stats = new GenerationStats();
        var builder = new UncertaintyReportBuilder(model.Tokenizer, "tiny-stories", prompt);
        foreach (var token in model.Generate(prompt, options, stats))
        {
            builder.Add(token);
        }
        return builder.Build(stats.FinishReason);
    }

    private static int Count(string text, string pattern) => Regex.Count(text, pattern);

    /// <summary>Pixels of the token backgrounds: light (every channel >= 120) and clearly coloured (channel spread >= 60);
    /// text, borders and the white page are not. Split by which of red and green dominates.</summary>
    private static (int Greenish, int Reddish, int DistinctColours) Colours(PngImage image)
    {
        int greenish = 0, reddish = 0;
        foreach (uint pixel in image.Pixels)
        {
            int r = (int)(pixel >> 24), g = (int)(pixel >> 16) & 0xFF, b = (int)(pixel >> 8) & 0xFF;
            int max = Math.Max(r, Math.Max(g, b)), min = Math.Min(r, Math.Min(g, b));
            if (min >= 120 && max - min >= 60)
            {
                if (g > r)
                {
                    greenish++;
                }
                else
                {
                    reddish++;
                }
            }
        }
        return (greenish, reddish, image.Pixels.Distinct().Count());
    }

    [Test]
    public void Chromium_renders_a_generated_report_as_coloured_token_spans_in_both_colourings()
    {
        Chromium.RequireExecutable();
        var report = GeneratedReport();
        string page = WritePage(report, "generated.html");

        string dom = Chromium.DumpDom(page);
        Assert.That(dom, Does.Contain("id=\"text\" class=\"text by-prob\" data-enhanced=\"true\""), "the page's script ran");
        Assert.That(Count(dom, "<span class=\"t[ \"]"), Is.EqualTo(report.Tokens.Count), "one span per generated token");
        Assert.That(Count(dom, "aria-describedby=\"tip\""), Is.EqualTo(report.Tokens.Count), "each token is described by the scripted tooltip");
        Assert.That(Count(dom, "data-title=\"token "), Is.EqualTo(report.Tokens.Count), "the plain tooltip moved aside for the scripted one");
        Assert.That(Chromium.DumpDom(page, "#entropy"), Does.Contain("class=\"text by-entropy\""), "#entropy switches the colouring");

        const int width = 1000, height = 900;
        var byProbability = PngImage.Read(Chromium.Screenshot(page, width, height));
        var byEntropy = PngImage.Read(Chromium.Screenshot(page, width, height, "#entropy"));
        var probability = Colours(byProbability);
        var entropy = Colours(byEntropy);
        TestContext.Out.WriteLine($"{report.Tokens.Count} tokens; screenshot {byProbability.Width}x{byProbability.Height}: " +
            $"by probability {probability}, by entropy {entropy} (greenish, reddish token pixels, distinct colours)");
        Assert.Multiple(() =>
        {
            Assert.That((byProbability.Width, byProbability.Height), Is.EqualTo((width, height)));
            Assert.That(probability.DistinctColours, Is.GreaterThan(200), "not blank: text, figures and a colour scale");
            Assert.That(probability.Greenish, Is.GreaterThan(5000), "likely tokens paint green");
            Assert.That(probability.Reddish, Is.GreaterThan(500), "unlikely tokens paint red to orange");
            Assert.That(entropy.Greenish + entropy.Reddish, Is.GreaterThan(5000), "the entropy colouring paints the tokens too");
            Assert.That(byEntropy.Pixels, Is.Not.EqualTo(byProbability.Pixels), "the two colourings differ");
        });
    }

    [Test]
    public void Chromium_runs_no_script_and_builds_no_element_from_token_text()
    {
        Chromium.RequireExecutable();
        var report = UncertaintyReportTests.HostileReport();
        string dom = Chromium.DumpDom(WritePage(report, "hostile.html"));
        Assert.Multiple(() =>
        {
            Assert.That(dom, Does.Contain("data-enhanced=\"true\""), "the page's script ran, so the embedded JSON parsed");
            Assert.That(dom, Does.Not.Contain("pwned=\"").And.Not.Contain("data-pwned"), "no script from the data ran");
            Assert.That(dom, Does.Not.Contain("<img").And.Not.Contain("<b>bold"), "no element from the data exists");
            Assert.That(Count(dom, "<span class=\"t[ \"]"), Is.EqualTo(report.Tokens.Count));
            Assert.That(dom, Does.Contain("&lt;script&gt;document.body.dataset.pwned='script'&lt;/script&gt;</span>"), "shown as text");
        });
    }
}
